"""`quantize` (one form and the grouped form): syntax nodes, grammar rules, AST builders and
canonical text. Its check, plan and step: surgery/front/statements/quantize/__init__.py."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

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
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.budgets import Fit

QuantizePart = Literal["layers", "attention", "mlp", "head", "embedding"]


@dataclass(frozen=True)
class QuantizeStmt:
    """`quantize <part> [<selector>] to int4|int8 [block N] [symmetric] [scales fp16] [gptq]`; no
    selector = every layer."""

    part: QuantizePart
    selector: Selector | None
    bits: int
    block: int | None = None
    symmetric: bool = False
    gptq: bool = False  # rounded by GPTQ on the calibration data instead of to nearest
    weighted: bool = False  # each block's grid searched against the calibration activations
    act_order: bool = False  # GPTQ rounds the columns of largest input energy first
    half_scales: bool = False  # `scales fp16`: scales stored in fp16 whatever the export's type
    span: Span = span_field()
    block_span: Span | None = span_field()
    gptq_span: Span | None = span_field()
    weighted_span: Span | None = span_field()
    act_order_span: Span | None = span_field()


@dataclass(frozen=True)
class QuantizeRule:
    """One `<rule> -> int4|int8 [block N] [symmetric] [gptq]` line of a grouped quantize."""

    selector: ImportanceRank | Selector | RestLayers
    bits: int
    block: int | None = None
    symmetric: bool = False
    gptq: bool = False  # rounded by GPTQ on the calibration data instead of to nearest
    weighted: bool = False
    act_order: bool = False
    half_scales: bool = False
    span: Span = span_field()
    block_span: Span | None = span_field()
    gptq_span: Span | None = span_field()
    weighted_span: Span | None = span_field()
    act_order_span: Span | None = span_field()


@dataclass(frozen=True)
class QuantizeModelStmt:
    """`quantize model to <bits> bits per weight [gptq] [act-order]`: every linear, the head and
    the embedding, each tensor's format chosen by measured sensitivity under the budget."""

    bits_per_weight: float
    gptq: bool = False
    act_order: bool = False
    span: Span = span_field()
    budget_span: Span | None = span_field()
    block: int | None = None  # options the preset chooses itself; kept to point at them
    symmetric: bool = False
    weighted: bool = True
    half_scales: bool = False  # the preset stores fp16 scales whether or not it says so
    block_span: Span | None = span_field()
    gptq_span: Span | None = span_field()
    weighted_span: Span | None = span_field()
    act_order_span: Span | None = span_field()


@dataclass(frozen=True)
class QuantizeGroupStmt:
    """`quantize <part> by <source> { rules }`: the first rule that matches a layer decides its width."""

    part: QuantizePart
    source: ImportanceSource
    rules: tuple[QuantizeRule, ...]
    fit: Fit | None = None  # `as many as fit`: the first rule's amount is searched for
    span: Span = span_field()


SYNTAX = """
// quantize <part> [<selector>] to int4|int8 [block N] [symmetric] [scales fp16] [weighted] [gptq] [act-order];
// part: layers, attention, mlp, head, embedding
quantize_stmt: "quantize" quantize_target "to" WIDTH quantize_option*
// quantize model to <bits> bits per weight [gptq] [act-order]: formats per tensor by sensitivity
quantize_model_stmt: "quantize" "model" "to" NUMBER "bits" "per" "weight" quantize_option*
?quantize_target: "layers" layer_set         -> quantize_layers
                | "layers" importance_rank importance_source -> quantize_layers_by_importance
                | "layers"                   -> quantize_all_layers
                | SUBLAYER selector?         -> quantize_sublayer
                | "head"                     -> quantize_head
                | "embedding"                -> quantize_embedding
SUBLAYER: "attention" | "mlp"
WIDTH: "int4" | "int8"
?quantize_option: "block" INT  -> block_option
                | "symmetric"  -> symmetric_option
                | "gptq"       -> gptq_option
                | "weighted"   -> weighted_option
                | "act-order"  -> act_order_option
                | "scales" "fp16" -> half_scales_option

// quantize layers by <source> { <rule> -> <width> ... }: the first rule that matches a layer wins.
quantize_group_stmt: "quantize" group_part importance_source fit_marker? "{" group_item* "}"
?group_item: quantize_rule
           | budget
group_part: "layers" -> group_layers
          | SUBLAYER
quantize_rule: rule_selector "->" WIDTH quantize_option*
?rule_selector: importance_rank      -> rule_importance
              | fit_rank             -> rule_fit
              | "layers" layer_set   -> rule_layers
              | "rest"               -> rule_rest
"""


def _quantize_stmt(ast, meta, children) -> QuantizeStmt:
    (part, selector), width, *options = children
    return QuantizeStmt(part=part, selector=selector, bits=int(width[3:]), span=ast.span(meta), **ast.options(options))


def _quantize_model_stmt(ast, meta, children) -> QuantizeModelStmt:
    number, *options = children
    fields = ast.options(options)
    return QuantizeModelStmt(bits_per_weight=float(number), span=ast.span(meta), budget_span=ast.tok(number), **fields)


def _quantize_group_stmt(ast, meta, children) -> QuantizeGroupStmt:
    part, source, *items = children
    marker = items.pop(0) if items and isinstance(items[0], Span) else None
    rules = tuple(item for item in items if isinstance(item, QuantizeRule))
    budgets = [item for item in items if not isinstance(item, QuantizeRule)]
    fit = ast.fit(budgets, marker, ast.span(meta)) if marker is not None or budgets else None
    return QuantizeGroupStmt(part=part, source=source, rules=rules, fit=fit, span=ast.span(meta))


def _quantize_rule(ast, meta, children) -> QuantizeRule:
    selector, width, *options = children
    return QuantizeRule(selector=selector, bits=int(width[3:]), span=ast.span(meta), **ast.options(options))


BUILDERS = {
    "quantize_stmt": _quantize_stmt,
    "quantize_layers": lambda ast, meta, children: ("layers", replace(children[0], span=ast.span(meta))),
    "quantize_layers_by_importance": lambda ast, meta, children: (
        "layers", ImportanceSelector(rank=children[0], source=children[1], span=ast.span(meta))
    ),
    "quantize_all_layers": lambda ast, meta, children: ("layers", None),
    "quantize_sublayer": lambda ast, meta, children: (str(children[0]), children[1] if len(children) > 1 else None),
    "quantize_head": lambda ast, meta, children: ("head", None),
    "quantize_embedding": lambda ast, meta, children: ("embedding", None),
    "block_option": lambda ast, meta, children: {"block": int(children[0]), "block_span": ast.tok(children[0])},
    "symmetric_option": lambda ast, meta, children: {"symmetric": True},
    "gptq_option": lambda ast, meta, children: {"gptq": True, "gptq_span": ast.span(meta)},
    "weighted_option": lambda ast, meta, children: {"weighted": True, "weighted_span": ast.span(meta)},
    "act_order_option": lambda ast, meta, children: {"act_order": True, "act_order_span": ast.span(meta)},
    "half_scales_option": lambda ast, meta, children: {"half_scales": True},
    "quantize_model_stmt": _quantize_model_stmt,
    "quantize_group_stmt": _quantize_group_stmt,
    "group_layers": lambda ast, meta, children: "layers",
    "group_part": lambda ast, meta, children: str(children[0]),
    "quantize_rule": _quantize_rule,
    "rule_importance": lambda ast, meta, children: children[0],
    "rule_fit": lambda ast, meta, children: children[0],
    "rule_layers": lambda ast, meta, children: replace(children[0], span=ast.span(meta)),
    "rule_rest": lambda ast, meta, children: RestLayers(span=ast.span(meta)),
}


def _width(item: Any) -> str:
    """`int4 block 64 symmetric`: a statement's, rule's or resolved item's width as written."""
    text = f"int{item.bits}"
    if item.block is not None:
        text += f" block {item.block}"
    text += " symmetric" if item.symmetric else ""
    text += " scales fp16" if item.half_scales else ""
    text += " weighted" if item.weighted else ""
    text += " gptq" if item.gptq else ""
    return text + (" act-order" if item.act_order else "")


def _unparse_rule(rule: QuantizeRule) -> str:
    if isinstance(rule.selector, RestLayers):
        target = "rest"
    elif isinstance(rule.selector, ImportanceRank):
        target = unparse_rank(rule.selector)
    else:
        target = unparse_selector(rule.selector)
    return f"{target} -> {_width(rule)}"


def unparse(statement: QuantizeStmt | QuantizeGroupStmt | QuantizeModelStmt) -> str:
    """Canonical text."""
    if isinstance(statement, QuantizeModelStmt):
        options = (" gptq" if statement.gptq else "") + (" act-order" if statement.act_order else "")
        return f"quantize model to {statement.bits_per_weight:g} bits per weight{options}"
    if isinstance(statement, QuantizeGroupStmt):
        lines = [_unparse_rule(rule) for rule in statement.rules]
        marker = ""
        if statement.fit is not None:
            lines += statement.fit.describe_items()
            marker = " as many as fit" if statement.fit.marked else ""
        body = "".join(f"    {line}\n" for line in lines)
        return f"quantize {statement.part} {unparse_source(statement.source)}{marker} {{\n{body}}}"
    if statement.part in ("head", "embedding") or statement.selector is None:
        target = statement.part
    elif statement.part == "layers":
        target = unparse_selector(statement.selector)
        target = target if target.startswith("layers ") else "layers " + target
    else:
        target = f"{statement.part} {unparse_selector(statement.selector)}"
    return f"quantize {target} to {_width(statement)}"
