"""The typed recipe AST: frozen dataclasses, each carrying the span it was parsed from.

Spans are excluded from equality, so two recipes that say the same thing compare equal
wherever they were written (this is what the parse -> unparse -> parse round trip checks).
`unparse` prints the canonical text of a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from surgery.source import Source, Span

Part = Literal["attention", "mlp", "block"]


def _span() -> Span:
    return field(default=None, compare=False, repr=False)  # type: ignore[return-value]


# Selectors: which of the original model's layers a statement targets.


@dataclass(frozen=True)
class LayerIndex:
    """One layer number as written; negative numbers count from the end."""

    value: int
    span: Span = _span()


@dataclass(frozen=True)
class LayerRange:
    """`a..b`, inclusive at both ends."""

    start: LayerIndex
    end: LayerIndex
    span: Span = _span()


@dataclass(frozen=True)
class LayerList:
    """`layers 3, 5, 9..12`."""

    items: tuple[LayerIndex | LayerRange, ...]
    span: Span = _span()


@dataclass(frozen=True)
class AllLayers:
    """`layers *`."""

    span: Span = _span()


@dataclass(frozen=True)
class FirstLayers:
    """`layers first N`."""

    count: int
    span: Span = _span()


@dataclass(frozen=True)
class LastLayers:
    """`layers last N`."""

    count: int
    span: Span = _span()


@dataclass(frozen=True)
class EvenlyLayers:
    """`layers evenly N`: N layers spread evenly over the depth, never the first or the last."""

    count: int
    span: Span = _span()


@dataclass(frozen=True)
class ImportanceSource:
    """`by similarity` (computed from the calibration), `by "file.json"`, or `by lim in "file.json"`."""

    metric: str | None = None
    file: str | None = None
    span: Span = _span()
    metric_span: Span | None = _span()
    file_span: Span | None = _span()


@dataclass(frozen=True)
class ImportanceRank:
    """`most|least important N` or `... P%`: how many layers, counted from which end."""

    rank: Literal["most", "least"]
    count: int | None = None
    percent: float | None = None
    span: Span = _span()


@dataclass(frozen=True)
class ImportanceSelector:
    """`most|least important N|P% by <source>`: layers ranked by importance scores."""

    rank: ImportanceRank
    source: ImportanceSource
    span: Span = _span()


@dataclass(frozen=True)
class RestLayers:
    """`rest` in a grouped quantize: every layer no earlier rule matched."""

    span: Span = _span()


Selector = LayerList | AllLayers | FirstLayers | LastLayers | EvenlyLayers | ImportanceSelector


# Statements.


@dataclass(frozen=True)
class ModelStmt:
    """`model "<spec>"`: which model the recipe operates on."""

    spec: str
    span: Span = _span()
    spec_span: Span = _span()


@dataclass(frozen=True)
class DropStmt:
    """`drop attention|mlp|block <selector>`."""

    part: Part
    selector: Selector
    span: Span = _span()


@dataclass(frozen=True)
class CalibrateStmt:
    """`calibrate on "<text>" [samples N] [length L] [seed S]`; omitted numbers take the defaults."""

    data: str
    samples: int | None = None
    length: int | None = None
    seed: int | None = None
    span: Span = _span()
    data_span: Span = _span()


QuantizePart = Literal["layers", "attention", "mlp", "head"]


@dataclass(frozen=True)
class QuantizeStmt:
    """`quantize <part> [<selector>] to int4|int8 [block N] [symmetric]`; no selector = every layer."""

    part: QuantizePart
    selector: Selector | None
    bits: int
    block: int | None = None
    symmetric: bool = False
    span: Span = _span()
    block_span: Span | None = _span()


@dataclass(frozen=True)
class QuantizeRule:
    """One `<rule> -> int4|int8 [block N] [symmetric]` line of a grouped quantize."""

    selector: ImportanceRank | Selector | RestLayers
    bits: int
    block: int | None = None
    symmetric: bool = False
    span: Span = _span()
    block_span: Span | None = _span()


@dataclass(frozen=True)
class QuantizeGroupStmt:
    """`quantize <part> by <source> { rules }`: the first rule that matches a layer decides its width."""

    part: QuantizePart
    source: ImportanceSource
    rules: tuple[QuantizeRule, ...]
    span: Span = _span()


@dataclass(frozen=True)
class VerifyStmt:
    """`verify perplexity on "<text>" max-increase P% [tokens N]`."""

    data: str
    max_increase: float
    tokens: int | None = None
    span: Span = _span()
    data_span: Span = _span()


@dataclass(frozen=True)
class FuseStmt:
    """`fuse layer N|auto|dynamic into head [weight A] [candidates a..b]`."""

    mode: Literal["static", "auto", "dynamic"]
    layer: LayerIndex | None = None
    weight: float | None = None
    candidates: LayerRange | None = None
    span: Span = _span()
    weight_span: Span | None = _span()


@dataclass(frozen=True)
class SplitStmt:
    """`split mlp <selector> into E experts top K`."""

    selector: Selector
    experts: int
    top_k: int
    span: Span = _span()


@dataclass(frozen=True)
class PruneStmt:
    """`prune experts <selector> to M [by frequency]` (frequency is the only rule so far)."""

    selector: Selector
    keep: int
    span: Span = _span()


@dataclass(frozen=True)
class MergeStmt:
    """`merge experts <selector> to M [grouping output|router] [weighting frequency|uniform] [rank R|P%]`."""

    selector: Selector
    groups: int
    grouping: str = "output"
    weighting: str = "frequency"
    rank: int | None = None
    rank_percent: float | None = None
    span: Span = _span()
    rank_span: Span | None = None


@dataclass(frozen=True)
class ExportStmt:
    """`export onnx [opset N] [without kv-cache] [with position-ids]`."""

    format: str = "onnx"
    opset: int | None = None
    kv_cache: bool = True
    position_ids: bool = False
    span: Span = _span()
    opset_span: Span | None = _span()


Statement = ModelStmt | CalibrateStmt | DropStmt | QuantizeStmt | QuantizeGroupStmt | VerifyStmt | FuseStmt | ExportStmt


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its statements in source order."""

    statements: tuple[Statement, ...]
    source: Source | None = field(default=None, compare=False, repr=False)


def _number(value: float) -> str:
    return f"{value:g}"


def unparse_source(source: ImportanceSource) -> str:
    """Canonical text of `by ...`."""
    if source.file is None:
        return f"by {source.metric}"
    if source.metric is None:
        return f'by "{source.file}"'
    return f'by {source.metric} in "{source.file}"'


def unparse_rank(rank: ImportanceRank) -> str:
    """Canonical text of `most|least important N|P%`."""
    amount = str(rank.count) if rank.count is not None else f"{_number(rank.percent)}%"
    return f"{rank.rank} important {amount}"


def unparse_selector(selector: Selector) -> str:
    """Canonical text of a selector."""
    if isinstance(selector, ImportanceSelector):
        return f"{unparse_rank(selector.rank)} {unparse_source(selector.source)}"
    if isinstance(selector, AllLayers):
        return "layers *"
    if isinstance(selector, FirstLayers):
        return f"layers first {selector.count}"
    if isinstance(selector, LastLayers):
        return f"layers last {selector.count}"
    if isinstance(selector, EvenlyLayers):
        return f"layers evenly {selector.count}"
    items = []
    for item in selector.items:
        if isinstance(item, LayerRange):
            items.append(f"{item.start.value}..{item.end.value}")
        else:
            items.append(str(item.value))
    return "layers " + ", ".join(items)


def unparse_statement(statement: Statement) -> str:
    """Canonical text of one statement."""
    if isinstance(statement, ModelStmt):
        return f'model "{statement.spec}"'
    if isinstance(statement, DropStmt):
        return f"drop {statement.part} {unparse_selector(statement.selector)}"
    if isinstance(statement, CalibrateStmt):
        text = f'calibrate on "{statement.data}"'
        for word in ("samples", "length", "seed"):
            if getattr(statement, word) is not None:
                text += f" {word} {getattr(statement, word)}"
        return text
    if isinstance(statement, QuantizeStmt):
        if statement.part == "head":
            target = "head"
        elif statement.selector is None:
            target = statement.part
        elif statement.part == "layers":
            target = unparse_selector(statement.selector)
            target = target if target.startswith("layers ") else "layers " + target
        else:
            target = f"{statement.part} {unparse_selector(statement.selector)}"
        return f"quantize {target} to {_width(statement)}"
    if isinstance(statement, QuantizeGroupStmt):
        rules = "".join(f"    {_unparse_rule(rule)}\n" for rule in statement.rules)
        return f"quantize {statement.part} {unparse_source(statement.source)} {{\n{rules}}}"
    if isinstance(statement, VerifyStmt):
        text = f'verify perplexity on "{statement.data}" max-increase {_number(statement.max_increase)}%'
        return text + (f" tokens {statement.tokens}" if statement.tokens is not None else "")
    if isinstance(statement, SplitStmt):
        selector = unparse_selector(statement.selector)
        return f"split mlp {selector} into {statement.experts} experts top {statement.top_k}"
    if isinstance(statement, MergeStmt):
        return (
            f"merge experts {unparse_selector(statement.selector)} to {statement.groups} "
            f"grouping {statement.grouping} weighting {statement.weighting}"
            + (f" rank {statement.rank}" if statement.rank is not None else "")
            + (f" rank {statement.rank_percent:g}%" if statement.rank_percent is not None else "")
        )
    if isinstance(statement, PruneStmt):
        return f"prune experts {unparse_selector(statement.selector)} to {statement.keep} by frequency"
    if isinstance(statement, FuseStmt):
        layer = str(statement.layer.value) if statement.mode == "static" else statement.mode
        text = f"fuse layer {layer} into head"
        if statement.weight is not None:
            text += f" weight {_number(statement.weight)}"
        if statement.candidates is not None:
            text += f" candidates {statement.candidates.start.value}..{statement.candidates.end.value}"
        return text
    if isinstance(statement, ExportStmt):
        text = f"export {statement.format}"
        if statement.opset is not None:
            text += f" opset {statement.opset}"
        if not statement.kv_cache:
            text += " without kv-cache"
        if statement.position_ids:
            text += " with position-ids"
        return text
    raise TypeError(f"not a statement: {statement!r}")


def _width(item: QuantizeStmt | QuantizeRule) -> str:
    text = f"int{item.bits}"
    if item.block is not None:
        text += f" block {item.block}"
    return text + (" symmetric" if item.symmetric else "")


def _unparse_rule(rule: QuantizeRule) -> str:
    if isinstance(rule.selector, RestLayers):
        target = "rest"
    elif isinstance(rule.selector, ImportanceRank):
        target = unparse_rank(rule.selector)
    else:
        target = unparse_selector(rule.selector)
    return f"{target} -> {_width(rule)}"


def unparse(recipe: Recipe) -> str:
    """Canonical recipe text: one statement per line, comments dropped."""
    return "".join(unparse_statement(s) + "\n" for s in recipe.statements)
