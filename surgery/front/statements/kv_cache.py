"""`quantize kv-cache [<selector>] to int8|int4 [per-channel|per-tensor|pre-rope]` and the grouped form
`quantize kv-cache by <source> { <rule> -> int8|int4 ... }`: the selected layers' KV caches
stored quantized, with scales calibrated on the recipe's calibration text.

Syntax, check, plan step and its description live here; the format is
surgery/formats/kv_cache.py, the calibration surgery/analysis/kv_calibration.py and the graph
pass passes/quantize_kv_cache.py. The layers are the original model's; a layer whose attention
was dropped has no cache, and is left out with a warning. Later statements win for a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.architectures import lookup
from surgery.diagnostics import Diagnostic
from surgery.formats.kv_cache import DEFAULT_GRANULARITY, PRE_ROPE, WIDTHS, KVCacheFormat
from surgery.front.budgets import Fit, KVCacheBudget
from surgery.front.grouped import check_rules
from surgery.front.plan_step import PlanStep, Run
from surgery.front.selection import ImportanceQuery
from surgery.front.selectors import (
    ImportanceRank,
    ImportanceSelector,
    ImportanceSource,
    RestLayers,
    Selector,
    span_field,
    unparse_rank,
    unparse_selector,
    unparse_source,
)
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex

SYNTAX = """
// quantize kv-cache [<selector>] to int8|int4 [per-channel|per-tensor|pre-rope]
quantize_kv_stmt: "quantize" "kv-cache" selector? "to" KV_WIDTH kv_option*
// quantize kv-cache by <source> [as many as fit] { <rule> -> int8|int4 [per-tensor|pre-rope] ... [budgets] }:
// the first rule that matches wins; with `as many as fit`, how many layers the first rule takes is searched;
// with `or drop attention least important` too, how many attention layers are dropped instead (a joint search)
quantize_kv_group_stmt: "quantize" "kv-cache" importance_source fit_marker? "{" kv_group_item* "}"
?kv_group_item: kv_rule
              | kv_trade
              | budget
kv_trade: "or" "drop" "attention" RANK "important" ("up" "to" INT)?
kv_rule: rule_selector "->" KV_WIDTH kv_option*
KV_WIDTH: "int8" | "int4" | "fp8"
?kv_option: "per-channel" -> per_channel_option
          | "per-tensor"  -> per_tensor_option
          | "pre-rope"    -> pre_rope_option
"""


@dataclass(frozen=True)
class QuantizeKVStmt:
    """`quantize kv-cache [<selector>] to <width> [per-channel|per-tensor]`; no selector = every layer."""

    selector: Selector | None
    width: str
    granularity: str = DEFAULT_GRANULARITY
    span: Span = span_field()
    width_span: Span = span_field()


@dataclass(frozen=True)
class KVRule:
    """One `<rule> -> <width> [per-tensor|pre-rope]` line of a grouped `quantize kv-cache`."""

    selector: ImportanceRank | Selector | RestLayers
    width: str
    granularity: str = DEFAULT_GRANULARITY
    span: Span = span_field()
    width_span: Span = span_field()

    @property
    def bits(self) -> int:
        """Bits per cached value."""
        return WIDTHS.get(self.width, 8)  # fp8 (refused at check) stores a byte too


@dataclass(frozen=True)
class AttentionTrade:
    """`or drop attention least important` in a searched `quantize kv-cache` block: the search
    may also drop the least important attention layers (by the group's source), trading each
    dropped layer's cache for wider caches in the layers that keep one
    (surgery/search/trade.py)."""

    rank: str = "least"
    most: int | None = None  # `up to N`: at most N drops (fewer combinations to build)
    span: Span = span_field()
    rank_span: Span = span_field()


@dataclass(frozen=True)
class QuantizeKVGroupStmt:
    """`quantize kv-cache by <source> [as many as fit] { rules [or drop attention ...] [budgets] }`."""

    source: ImportanceSource
    rules: tuple[KVRule, ...]
    fit: Fit | None = None  # `as many as fit`: the first rule's amount is searched for
    span: Span = span_field()
    trade: AttentionTrade | None = None  # the search also chooses how many attention layers to drop

    part = "attention"  # the layers it ranks and searches over: those that keep attention (a cache)


def _stmt(ast, meta, children) -> QuantizeKVStmt:
    selector = children[0] if children and not isinstance(children[0], str) else None
    rest = children[1:] if selector is not None else children
    width, *options = rest
    return QuantizeKVStmt(selector, str(width), span=ast.span(meta), width_span=ast.tok(width), **ast.options(options))


def _rule(ast, meta, children) -> KVRule:
    selector, width, *options = children
    return KVRule(selector, str(width), span=ast.span(meta), width_span=ast.tok(width), **ast.options(options))


def _group(ast, meta, children) -> QuantizeKVGroupStmt:
    source, *items = children
    marker = items.pop(0) if items and isinstance(items[0], Span) else None
    rules = tuple(item for item in items if isinstance(item, KVRule))
    trades = [item for item in items if isinstance(item, AttentionTrade)]
    budgets = [item for item in items if not isinstance(item, KVRule | AttentionTrade)]
    fit = ast.fit(budgets, marker, ast.span(meta)) if marker is not None or budgets else None
    # A second `or drop attention` line says nothing new; the first is kept (the check names it).
    return QuantizeKVGroupStmt(source, rules, fit, span=ast.span(meta), trade=trades[0] if trades else None)


def _trade(ast, meta, children) -> AttentionTrade:
    rank, *most = children
    return AttentionTrade(str(rank), int(most[0]) if most else None, span=ast.span(meta), rank_span=ast.tok(rank))


NODES = (QuantizeKVStmt, QuantizeKVGroupStmt)
GRAMMAR = ("quantize_kv_stmt", "quantize_kv_group_stmt")
BUILDERS = {
    "quantize_kv_stmt": _stmt,
    "quantize_kv_group_stmt": _group,
    "kv_rule": _rule,
    "kv_trade": _trade,
    "per_channel_option": lambda ast, meta, children: {"granularity": "per-channel"},
    "per_tensor_option": lambda ast, meta, children: {"granularity": "per-tensor"},
    "pre_rope_option": lambda ast, meta, children: {"granularity": PRE_ROPE},
}


def _width(item: QuantizeKVStmt | KVRule) -> str:
    return item.width + ("" if item.granularity == DEFAULT_GRANULARITY else f" {item.granularity}")


def unparse(statement: QuantizeKVStmt | QuantizeKVGroupStmt) -> str:
    """Canonical text."""
    if isinstance(statement, QuantizeKVGroupStmt):
        lines = []
        for rule in statement.rules:
            if isinstance(rule.selector, RestLayers):
                target = "rest"
            elif isinstance(rule.selector, ImportanceRank):
                target = unparse_rank(rule.selector)
            else:
                target = unparse_selector(rule.selector)
            lines.append(f"    {target} -> {_width(rule)}\n")
        if statement.trade is not None:
            most = f" up to {statement.trade.most}" if statement.trade.most is not None else ""
            lines.append(f"    or drop attention {statement.trade.rank} important{most}\n")
        marker = ""
        if statement.fit is not None:
            lines += [f"    {line}\n" for line in statement.fit.describe_items()]
            marker = " as many as fit" if statement.fit.marked else ""
        return f"quantize kv-cache {unparse_source(statement.source)}{marker} {{\n{''.join(lines)}}}"
    target = f" {unparse_selector(statement.selector)}" if statement.selector is not None else ""
    return f"quantize kv-cache{target} to {_width(statement)}"


@dataclass(frozen=True)
class ResolvedKV:
    """One statement or rule, checked: its format and exactly one of explicit `layers`, an
    importance `query` or the group's `rest` (every layer: `layers` None, no query, not rest)."""

    format: KVCacheFormat
    span: Span
    layers: tuple[int, ...] | None = None
    query: ImportanceQuery | None = None
    rest: bool = False
    group: int | None = None


def _format(c: Checker, item: QuantizeKVStmt | KVRule, export, index: ModelIndex) -> KVCacheFormat | None:
    target = export.target
    if item.width == "fp8":
        c.error("fp8 KV caches are not supported", item.width_span,
                "onnxruntime 1.32 runs a float8 cache only on CUDA (its CPU GroupQueryAttention has no kernel for "
                "it); the int8 and int4 caches surgery writes run on both" + ("" if target == "cuda" else ": use int8"))
        return None
    fmt = KVCacheFormat.of(WIDTHS[item.width], item.granularity)
    if fmt.before_rope:
        problem = pre_rope_problem(index)
        if problem:
            c.error(f"a pre-rope KV cache does not fit {index.name}: {problem}", item.span,
                    "use `per-channel` (GroupQueryAttention's own cache)")  # fmt: skip
            return None
        if export.position_ids:
            c.error("a pre-rope KV cache rotates its keys by their place in the cache, not by `position_ids`",
                    item.span, "the cache does not keep the positions its keys were written at: drop "
                    "`with position-ids` from the export, or use `per-channel`")  # fmt: skip
            return None
    return fmt


def pre_rope_problem(index: ModelIndex) -> str:
    """Why a `pre-rope` cache's own attention graph (surgery/nodes/pre_rope_cache.py) cannot
    stand in for this family's attention, or "" where it can."""
    family = lookup(index.architecture)
    if family is None:
        return ""  # an unknown family is refused by the model check itself
    attention = family.attention
    if index.latent_attention or attention.latent:
        return "its latent attention caches one compressed latent, not keys and values"
    if attention.sinks:
        return "its attention sinks are GroupQueryAttention's `head_sink`, which the pre-rope graph does not emit"
    if attention.qk_norm_after_rope:
        return "its Q/K norms come after RoPE, so the cached keys would have to be normalized at every read"
    if index.head_dim % 2:
        return f"its head size {index.head_dim} is odd (int4 packs channel i with i + head_dim / 2)"
    return ""


def check(c: Checker, index: ModelIndex, done: dict) -> list[ResolvedKV]:
    """Formats the kernels run, layers in range (or an importance ranking of attention), an
    export with a KV cache, and a grouped form whose `rest` comes last."""
    statements = [s for s in c.recipe.statements if isinstance(s, (QuantizeKVStmt, QuantizeKVGroupStmt))]
    if not statements:
        return []
    export, _ = done["export"]
    resolved: list[ResolvedKV] = []
    for group, statement in enumerate(statements):
        if not export.kv_cache:
            c.error("the KV cache is quantized but the export has none", statement.span,
                    "drop `without kv-cache` from the export statement")  # fmt: skip
            continue
        if export.target == "cuda":
            c.error("a quantized KV cache is written for CPU outputs only", statement.span,
                    "onnxruntime's CUDA GroupQueryAttention reads a prompt's new keys unrounded and a quantized past "
                    "only from genai's shared buffer, which verification cannot replay yet (and measured on an H100 "
                    "it decoded 1.3 to 3x slower than an fp16 cache); drop `for cuda`, or the quantize")  # fmt: skip
            continue
        if isinstance(statement, QuantizeKVStmt):
            fmt = _format(c, statement, export, index)
            if fmt is None:
                continue
            if statement.selector is None:
                resolved.append(ResolvedKV(fmt, statement.span))
            elif isinstance(statement.selector, ImportanceSelector):
                query = c.importance(statement.selector.rank, statement.selector.source, "attention", index,
                                     statement.selector.span)  # fmt: skip
                if query is not None:
                    resolved.append(ResolvedKV(fmt, statement.span, query=query))
            else:
                layers = c.attention_selector(statement.selector, index, "quantize kv-cache")
                if layers is not None:
                    resolved.append(ResolvedKV(fmt, statement.span, layers=layers))
            continue
        resolved += _check_group(c, statement, group, index, export)
    return resolved


def _check_group(c: Checker, statement: QuantizeKVGroupStmt, group: int, index: ModelIndex, export):
    def item_of(rule: KVRule) -> ResolvedKV | None:
        fmt = _format(c, rule, export, index)
        return ResolvedKV(fmt, rule.span, group=group) if fmt is not None else None

    if statement.trade is not None:
        _check_trade(c, statement)
    return check_rules(c, statement, "attention", index, "quantize kv-cache", item_of)


def _check_trade(c: Checker, statement: QuantizeKVGroupStmt) -> None:
    """`or drop attention least important` needs a searched block with a kv-cache budget (which
    sets the widths at each number of drops) and a quality budget (which chooses among them)."""
    trade, fit = statement.trade, statement.fit
    if trade.rank != "least":
        c.error("only the least important attention layers can be dropped for cache", trade.rank_span,
                "write `or drop attention least important`")  # fmt: skip
    if fit is None or not fit.marked:
        c.error("`or drop attention` is a choice the search makes: the block needs `as many as fit`", trade.span,
                f"write `quantize kv-cache {unparse_source(statement.source)} as many as fit {{ ... }}`")  # fmt: skip
        return
    if not any(isinstance(b, KVCacheBudget) for b in fit.budgets):
        c.error("`or drop attention` needs a kv-cache budget", trade.span,
                "the budget sets how many layers keep the wider cache at each number of drops; e.g. "
                "`kv-cache at most 1 GB at 32768 tokens`")  # fmt: skip
    if not fit.quality:
        c.error("`or drop attention` needs a quality budget", trade.span,
                "the search keeps the measured combination with the best quality; e.g. "
                '`perplexity on "wikitext-2-test" max-increase 5% window 4096`')  # fmt: skip
    if trade.most is not None and trade.most < 1:
        c.error("`up to` needs at least one drop", trade.span, "leave out `or drop attention` to drop none")
    if fit.rescore:
        c.error("`rescore` does not apply with `or drop attention`", trade.span,
                "the dropped layers are the least important by the group's scores on the original model")  # fmt: skip
    if fit.search != "bisect":
        c.error("`search` does not apply with `or drop attention`", trade.span,
                "the search measures every number of drops where the budget leaves a choice")  # fmt: skip


def plan(state: PlanState) -> list[PlanStep]:
    """One step per statement or rule, over the layers that still have attention."""
    steps: list[PlanStep] = []
    owner: dict[int, ResolvedKV] = {}
    taken: dict[int, set[int]] = {}  # group -> layers its earlier rules matched
    present = sorted(state.attention)
    for item in state.checked.of("kv_cache"):
        candidates = [layer for layer in present if layer not in taken.get(item.group, set())]
        extra: dict[str, Any] = {}
        if item.query is not None:
            chosen, extra = state.select(item.query, present)
            layers = tuple(layer for layer in chosen if layer in candidates)
        elif item.layers is not None:
            layers = tuple(layer for layer in item.layers if layer in candidates)
        else:
            layers = tuple(candidates)
        if item.group is not None:
            taken.setdefault(item.group, set()).update(layers)
        note = ""
        if not layers:
            reason = "earlier rules of the group took them" if item.group is not None else "their attention was dropped"
            note = f"no effect: no layer with a KV cache left to match ({reason})"
            state.warnings.append(Diagnostic("warning", "this KV cache selection matches no layers", item.span, reason))
        overridden = sorted({owner[layer].span.line for layer in layers if layer in owner})
        if overridden:
            state.warnings.append(Diagnostic(
                "warning", f"overrides the KV cache format set on line {', '.join(map(str, overridden))} for some "
                "layers", item.span, "the later statement wins"))  # fmt: skip
        owner.update({layer: item for layer in layers})
        steps.append(QuantizeKVCacheStep(
            action="quantize kv-cache", phase="graph",
            parameters={**item.format.to_json(), "layers": list(layers), **extra},
            layers=layers, targets=tuple(state.checked.index.part_path(layer, "attention") for layer in layers),
            source=item.span, note=note))  # fmt: skip
    return steps


@dataclass(frozen=True)
class QuantizeKVCacheStep(PlanStep):
    """A `quantize kv-cache` step. Every one of a plan acts as one: the scales of all their
    layers are calibrated in one walk over the calibration text, then each step's pass sets its
    layers' formats (a later step's layers are taken from the earlier ones)."""

    timing: ClassVar[str] = "passes"
    together: ClassVar[bool] = True

    @property
    def format(self) -> KVCacheFormat:
        """The cache format of this step's layers."""
        return KVCacheFormat.from_json(self.parameters)

    def describe(self) -> str:
        """One line for `surgery plan`."""
        layers = f"layers {format_layers(self.layers)}" if self.layers else "no layer"
        scales = "scales calibrated on the calibration data"
        return f"quantize the KV cache of {layers} to {self.format.describe()}, {scales}"

    @classmethod
    def run_all(cls, run: Run, steps: list[PlanStep]) -> None:
        """Calibrate every quantized layer's scales, then run each step's pass over its layers."""
        from surgery.analysis.kv_calibration import kv_quantizations
        from surgery.passes.quantize_kv_cache import QuantizeKVCache

        formats: dict[int, KVCacheFormat] = {}
        for step in steps:
            formats.update({layer: step.format for layer in step.layers})
        if not formats:
            return
        quantizations = kv_quantizations(run.graph, formats, run.calibration_tokens(), run.progress,
                                         run.settings.device)  # fmt: skip
        for position, step in enumerate(steps):
            later = {layer for other in steps[position + 1 :] for layer in other.layers}
            layers = tuple(layer for layer in step.layers if layer not in later)
            if layers:
                chosen = {layer: quantizations[layer] for layer in layers}
                run.graph_pass(step, QuantizeKVCache(layers, chosen))
