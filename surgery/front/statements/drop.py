"""`drop attention|mlp|block <selector>`: remove sub-blocks or whole layers.

Grammar: `drop_stmt` (`SYNTAX` below). Passes: passes/drop_attention.py, drop_mlp.py,
drop_block.py (by the plan step's action)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from surgery.front.budgets import check_fit
from surgery.front.plan_step import GraphPassStep, PlanStep
from surgery.front.selection import ImportanceQuery
from surgery.front.selectors import (
    ImportanceSelector,
    Part,
    Selector,
    span_field,
    unparse_selector,
)
from surgery.front.statements.base import SCORE_PART
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex


@dataclass(frozen=True)
class DropStmt:
    """`drop attention|mlp|block <selector>`."""

    part: Part
    selector: Selector
    span: Span = span_field()


@dataclass(frozen=True)
class ResolvedDrop:
    """A drop statement: sorted original layer numbers, or an importance query the plan resolves."""

    part: str
    layers: tuple[int, ...]
    statement: DropStmt
    query: ImportanceQuery | None = None


NODES = (DropStmt,)
GRAMMAR = ("drop_stmt",)

SYNTAX = """
drop_stmt: "drop" PART selector
         | "drop" PART fit_rank importance_source fit_marker "{" budget* "}" -> drop_fit_stmt
PART: "attention" | "mlp" | "block"
"""

def _drop_stmt(ast, meta, children) -> DropStmt:
    part, selector = children
    return DropStmt(part=str(part), selector=selector, span=ast.span(meta))


def _drop_fit_stmt(ast, meta, children) -> DropStmt:
    part, rank, source, marker, *budgets = children
    fit = ast.fit(budgets, marker, ast.span(meta))
    rank = replace(rank, fit=fit)
    selector = ImportanceSelector(rank=rank, source=source, span=ast.source.span(rank.span.start, fit.span.end))
    return DropStmt(part=str(part), selector=selector, span=ast.span(meta))


BUILDERS = {"drop_stmt": _drop_stmt, "drop_fit_stmt": _drop_fit_stmt}


def unparse(statement: DropStmt) -> str:
    """Canonical text."""
    return f"drop {statement.part} {unparse_selector(statement.selector)}"


def check(c: Checker, index: ModelIndex, done: dict) -> list[ResolvedDrop]:
    """Resolve each drop's layers (or importance query); no decoder may lose every attention."""
    resolved: list[ResolvedDrop] = []
    for statement in c.recipe.statements:
        if not isinstance(statement, DropStmt):
            continue
        selector = statement.selector
        if isinstance(selector, ImportanceSelector):
            if selector.rank.fit is not None:
                check_fit(c, selector.rank.fit, index, more_is_lighter=True, what="the number dropped")
            query = c.importance(selector.rank, selector.source, SCORE_PART[statement.part], index, selector.span)
            if query is not None:
                resolved.append(ResolvedDrop(statement.part, (), statement, query))
            continue
        if statement.part == "attention":
            layers = c.attention_selector(selector, index, "drop attention")
        else:
            layers = c.selector(selector, index)
        if layers is not None:
            resolved.append(ResolvedDrop(statement.part, layers, statement))
    _overlaps(c, [drop for drop in resolved if drop.query is None])
    attention_gone: set[int] = set()
    attention = set(index.attention_layers)
    for drop in resolved:
        if drop.part in ("attention", "block"):
            attention_gone |= set(drop.layers) & attention
            if attention_gone == attention:
                c.error(
                    f"this drops the attention of every layer ({len(attention)} of {len(attention)})",
                    drop.statement.span,
                    "a decoder needs at least one attention layer; keep at least one",
                )
                break
    return resolved


def _overlaps(c, resolved: list[ResolvedDrop]) -> None:
    """Warn where a statement drops something an earlier statement already dropped."""
    removed: dict[tuple[str, int], DropStmt] = {}
    for drop in resolved:
        parts = ("attention", "mlp") if drop.part == "block" else (drop.part,)
        keys = [(part, layer) for layer in drop.layers for part in parts]
        clashes = [key for key in keys if key in removed]
        for part in ("attention", "mlp"):
            layers = [layer for p, layer in clashes if p == part]
            if not layers:
                continue
            lines = sorted({removed[(part, layer)].span.line for layer in layers})
            c.warning(
                f"overlapping selection: the {part} of layer(s) {format_layers(layers)} is already dropped "
                f"on line {', '.join(map(str, lines))}",
                drop.statement.selector.span,
                "the overlapping part has no further effect",
            )
        for key in keys:
            removed.setdefault(key, drop.statement)


def plan(state: PlanState) -> list[PlanStep]:
    """One step per drop, on what earlier statements left; updates the state's kept parts."""
    index = state.checked.index
    steps = []
    for drop in state.checked.of("drop"):
        present = {"attention": state.attention, "mlp": state.mlp, "block": state.blocks}[drop.part]
        extra: dict[str, Any] = {}
        if drop.query is not None:
            layers, extra = state.select(drop.query, sorted(present))
        else:
            # Only what is still there: earlier statements may already have removed a part.
            layers = tuple(layer for layer in drop.layers if layer in present)
        if drop.part == "block":
            state.blocks -= set(layers)
            state.attention -= set(layers)
            state.mlp -= set(layers)
        else:
            present -= set(layers)
        note = "" if layers else "no effect: everything selected was already dropped"
        steps.append(
            DropStep(
                action=f"drop {drop.part}",
                phase="graph",
                parameters={"layers": list(layers), **extra},
                layers=layers,
                targets=tuple(index.part_path(layer, drop.part) for layer in layers),
                source=drop.statement.span,
                note=note,
            )
        )
    return steps


@dataclass(frozen=True)
class DropStep(GraphPassStep):
    """A `drop attention|mlp|block` step: the graph pass of its action over its layers."""

    def describe(self) -> str:
        """One line for `surgery plan`."""
        return f"{self.action} layers {format_layers(self.layers)}"

