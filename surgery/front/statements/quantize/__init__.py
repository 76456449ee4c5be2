"""`quantize <part> [<selector>] to int4|int8 [block N] [symmetric] [gptq]` and the grouped form
`quantize layers by <source> { rule -> width ... }`: MatMulNBits for the chosen linears, and
`quantize embedding to ...`: GatherBlockQuantized for the vocabulary table.
Syntax, nodes and canonical text: syntax.py beside this file. Passes: passes/quantize.py
and passes/quantize_embedding.py (ONNX passes after export and verification)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.diagnostics import Diagnostic
from surgery.formats.names import EMBEDDING, HEAD
from surgery.formats.weights import BLOCKS, DEFAULT_BLOCK, QuantizedTarget, WeightFormat
from surgery.front.grouped import check_rules
from surgery.front.plan_step import PlanStep, Run
from surgery.front.selection import ImportanceQuery
from surgery.front.selectors import AllLayers, ImportanceSelector
from surgery.front.statements.base import SCORE_PART
from surgery.front.statements.quantize.refusals import unquantizable
from surgery.front.statements.quantize.rounding import check_preset, rounding_holds
from surgery.front.statements.quantize.syntax import (
    BUILDERS,
    SYNTAX,
    QuantizeGroupStmt,
    QuantizeModelStmt,
    QuantizePart,
    QuantizeRule,
    QuantizeStmt,
    _width,
    unparse,
)
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex




@dataclass(frozen=True)
class ResolvedQuantize:
    """One quantize statement, or one rule of a grouped quantize, checked.

    Exactly one of: `layers` (explicit), `query` (by importance), `rest` (the group's
    leftovers); the head has none of them.
    """

    part: str  # "layers", "attention", "mlp" or "head"
    bits: int
    block: int
    symmetric: bool
    span: Span | None
    layers: tuple[int, ...] = ()
    gptq: bool = False
    query: ImportanceQuery | None = None
    rest: bool = False
    group: int | None = None  # rules of one grouped statement share a number
    weighted: bool = False
    act_order: bool = False
    bits_per_weight: float | None = None  # `quantize model to <bits> bits per weight`
    half_scales: bool = False  # `scales fp16`


NODES = (QuantizeStmt, QuantizeGroupStmt, QuantizeModelStmt)
GRAMMAR = ("quantize_stmt", "quantize_group_stmt", "quantize_model_stmt")


def check(c: Checker, index: ModelIndex, done: dict) -> list[ResolvedQuantize]:
    """Each quantize statement, and each rule of a grouped one, with its layers or query."""
    resolved: list[ResolvedQuantize] = []
    groups = 0
    for statement in c.recipe.statements:
        if isinstance(statement, QuantizeModelStmt):
            others = [s for s in c.recipe.statements if isinstance(s, NODES) and s is not statement]
            if check_preset(c, statement, index, others):
                resolved.append(ResolvedQuantize("model", 4, 0, False, statement.span, gptq=statement.gptq,
                                                 weighted=True, act_order=statement.act_order,
                                                 bits_per_weight=statement.bits_per_weight))  # fmt: skip
            continue
        if isinstance(statement, QuantizeStmt):
            if not rounding_holds(c, statement):
                continue
            block = _block(c, statement)
            if statement.part == "head":
                resolved.append(
                    ResolvedQuantize(
                        "head", statement.bits, block, statement.symmetric, statement.span, gptq=statement.gptq,
                        weighted=statement.weighted, act_order=statement.act_order,
                        half_scales=statement.half_scales,
                    )  # fmt: skip
                )
                continue
            if statement.part == "embedding":
                if statement.gptq or statement.weighted:
                    c.error(
                        "GPTQ and weighted grids round a linear layer against its inputs; the embedding is a "
                        "table lookup",
                        statement.gptq_span or statement.weighted_span or statement.span,
                        "drop `gptq` and `weighted` here (the embedding is rounded to nearest); a tied head shares "
                        "its table "
                        "when both have the same width",
                    )
                    continue
                if index.hidden_size % block:
                    c.error(
                        f"the embedding's rows ({index.hidden_size} values) do not split into blocks of {block}",
                        statement.block_span or statement.span,
                        "choose a block that divides the hidden size: "
                        + ", ".join(str(b) for b in BLOCKS if index.hidden_size % b == 0),
                    )
                    continue
                resolved.append(
                    ResolvedQuantize("embedding", statement.bits, block, statement.symmetric, statement.span,
                                     half_scales=statement.half_scales)  # fmt: skip
                )
                continue
            refusal = unquantizable(index, statement.part)
            if refusal is not None:
                c.error(refusal[0], statement.span, refusal[1])
                continue
            selector = statement.selector or AllLayers(span=statement.span)
            item = ResolvedQuantize(statement.part, statement.bits, block, statement.symmetric, statement.span,
                                    gptq=statement.gptq, weighted=statement.weighted,
                                    act_order=statement.act_order, half_scales=statement.half_scales)  # fmt: skip
            if isinstance(selector, ImportanceSelector):
                query = c.importance(selector.rank, selector.source, SCORE_PART[statement.part], index, selector.span)
                if query is not None:
                    resolved.append(replace(item, query=query))
            else:
                layers = c.selector(selector, index)
                if layers is not None:
                    resolved.append(replace(item, layers=layers))
        elif isinstance(statement, QuantizeGroupStmt):
            resolved.extend(_group(c, statement, groups, index))
            groups += 1
    return resolved


def _group(c, statement: QuantizeGroupStmt, group: int, index: ModelIndex) -> list[ResolvedQuantize]:
    refusal = unquantizable(index, statement.part)
    if refusal is not None:
        c.error(refusal[0], statement.span, refusal[1])
        return []

    def item_of(rule: QuantizeRule) -> ResolvedQuantize | None:
        if not rounding_holds(c, rule):
            return None
        return ResolvedQuantize(statement.part, rule.bits, _block(c, rule), rule.symmetric, rule.span, group=group,
                                gptq=rule.gptq, weighted=rule.weighted, act_order=rule.act_order,
                                half_scales=rule.half_scales)  # fmt: skip

    return check_rules(c, statement, SCORE_PART[statement.part], index, f"quantize {statement.part}", item_of)


def _block(c, item: QuantizeStmt | QuantizeRule) -> int:
    if item.block is None:
        return DEFAULT_BLOCK
    if item.block not in BLOCKS:
        c.error(
            f"block size {item.block} is not supported",
            item.block_span or item.span,
            "MatMulNBits blocks: " + ", ".join(map(str, BLOCKS)) + f" (default {DEFAULT_BLOCK})",
        )
    return item.block


def plan(state: PlanState) -> list[PlanStep]:
    """One step per quantize statement or rule, targets = the exported linears it converts."""
    checked = state.checked
    index = checked.index
    blocks, mlp, warnings = state.blocks, state.mlp, state.warnings
    # A layer's token mixer: its attention, or its short convolution (LFM2), whose projections
    # quantize as the attention's would.
    attention = state.attention | (blocks & set(index.conv_layers))
    steps: list[PlanStep] = []
    owner: dict[str, ResolvedQuantize] = {}  # linear -> the statement that last set its width
    taken: dict[int, set[int]] = {}  # group -> layers its earlier rules matched
    for item in checked.of("quantize"):
        parameters: dict[str, Any] = {
            "part": item.part,
            "bits": item.bits,
            "block": item.block,
            "symmetric": item.symmetric,
            "half_scales": item.half_scales,
            "gptq": item.gptq,
            "weighted": item.weighted,
            "act_order": item.act_order,
        }
        if item.part == "model":
            parameters["bits_per_weight"] = item.bits_per_weight
            layers = tuple(sorted(attention | mlp))
            targets = []
            for layer in layers:
                if layer in attention:
                    targets += index.linear_names(layer, "attention")
                if layer in mlp:
                    targets += index.linear_names(layer, "mlp")
            targets += [HEAD, EMBEDDING]
            parameters["layers"] = list(layers)
            steps.append(QuantizeStep(action="quantize", phase="onnx", parameters=parameters, layers=layers,
                                      targets=tuple(targets), source=item.span))  # fmt: skip
            continue
        if item.part in ("head", "embedding"):
            layers: tuple[int, ...] = ()
            targets = [HEAD if item.part == "head" else EMBEDDING]
        else:
            present = {"layers": blocks, "attention": attention, "mlp": mlp}[item.part]
            candidates = sorted(present)
            if item.group is not None:
                candidates = [layer for layer in candidates if layer not in taken.get(item.group, set())]
            if item.query is not None:
                # A rule ranks over every layer that has the part, so `most important 50%` after
                # `most important 25%` in one group means the top half, whose top quarter is taken.
                layers, extra = state.select(item.query, sorted(present))
                layers = tuple(layer for layer in layers if layer in candidates)
                parameters.update(extra)
            elif item.rest:
                layers = tuple(candidates)
            else:
                layers = tuple(layer for layer in item.layers if layer in candidates)
            if item.group is not None:
                taken.setdefault(item.group, set()).update(layers)
            targets = []
            for layer in layers:
                if item.part in ("layers", "attention") and layer in attention:
                    targets += index.linear_names(layer, "attention")
                if item.part in ("layers", "mlp") and layer in mlp:
                    targets += index.linear_names(layer, "mlp")
        note = ""
        if item.part not in ("head", "embedding") and not layers:
            reason = "earlier rules of the group took them" if item.group is not None else "they were all dropped"
            note = f"no effect: no layer left to match ({reason})"
            warnings.append(Diagnostic("warning", "this quantize selection matches no layers", item.span, reason))
        overridden = sorted({owner[t].span.line for t in targets if t in owner})
        if overridden:
            warnings.append(
                Diagnostic(
                    "warning",
                    f"overrides the quantization set on line {', '.join(map(str, overridden))} for some linear layers",
                    item.span,
                    "the later statement wins",
                )
            )
        for target in targets:
            owner[target] = item
        steps.append(
            QuantizeStep(
                action="quantize",
                phase="onnx",
                parameters={**parameters, "layers": list(layers)},
                layers=layers,
                targets=tuple(targets),
                source=item.span,
                note=note,
            )
        )
    embedding, head = owner.get(EMBEDDING), owner.get(HEAD)
    if embedding is not None and index.tied_embeddings:
        same = head is not None and (head.bits, head.block, head.symmetric, head.half_scales) == (
            embedding.bits, embedding.block, embedding.symmetric, embedding.half_scales
        )  # fmt: skip
        if not same:
            mb = index.vocab_size * index.hidden_size * 4 / 1e6
            warnings.append(
                Diagnostic(
                    "warning",
                    "the head is tied to the embedding but not quantized like it: it is stored as a separate "
                    + ("float" if head is None else f"int{head.bits}")
                    + f" weight ({mb:.0f} MB in fp32)",
                    embedding.span,
                    f"add `quantize head to {_width(embedding)}` (same width, block and symmetry) so both read "
                    "one quantized matrix",
                )
            )
    return steps


@dataclass(frozen=True)
class QuantizeStep(PlanStep):
    """A `quantize` step; every quantize step of a plan acts as one (later ones override earlier
    ones' widths), as linears quantized while written or as ONNX passes after the export."""

    timing: ClassVar[str] = "quantize"
    together: ClassVar[bool] = True

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        if p["part"] == "model":
            rounding = "GPTQ on the calibration data, weighted grids" if p["gptq"] else "weighted grids"
            rounding += ", act-order" if p.get("act_order") else ""
            return (
                f"quantize model to {p['bits_per_weight']:g} bits per weight: the linears of layers "
                f"{format_layers(self.layers)}, the head and the embedding, each int4 or int8 (blocks of 128, 64 "
                f"or 32, zero points, fp16 scales) by its measured sensitivity on the calibration data; {rounding}"
            )
        part = {"layers": "linears", "attention": "attention linears", "mlp": "MLP linears"}.get(p["part"], "")
        layers = f"layers {format_layers(self.layers)}" if self.layers else "no layer"
        stored = WeightFormat.from_json(p)
        note = ""
        if p.get("gptq") or p.get("weighted"):
            note = QuantizedTarget(stored, bool(p.get("gptq")), bool(p.get("weighted")), bool(p.get("act_order")))
            note = note.rounding()
        if p["part"] == "embedding":
            return f"quantize embedding to {stored.describe(stored.embedding_operator, note)}"
        what = "head" if p["part"] == "head" else f"{part} of {layers}"
        return f"quantize {what} to {stored.describe(note=note)}"

    @classmethod
    def run_all(cls, run: Run, steps: list[PlanStep]) -> None:
        """Quantize the exported model's linears and embedding (surgery/executor/quantization.py)."""
        from surgery.executor.quantization import quantize_output

        quantize_output(run, steps)


__all__ = [
    "BUILDERS", "GRAMMAR", "NODES", "SYNTAX", "QuantizeGroupStmt", "QuantizeModelStmt",
    "QuantizePart", "QuantizeRule", "QuantizeStep", "QuantizeStmt", "ResolvedQuantize", "check", "plan", "unparse",
]  # fmt: skip
