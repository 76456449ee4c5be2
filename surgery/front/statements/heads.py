"""`drop heads <query heads> of <selector>`: remove query heads from the attention of some layers.

Its syntax, node and builder, check, plan step and the step's description and run live here
(as in every statement module); its graph pass is passes/drop_heads.py; the rule both check and
pass hold to is surgery/analysis/head_rules.py.
Head numbers are the original model's, 0-based, ranges inclusive (`0, 4..5`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery import architectures
from surgery.analysis.head_rules import head_problems
from surgery.front.plan_step import GraphPassStep, PlanStep, Run
from surgery.front.selectors import ImportanceSelector, LayerIndex, LayerList, Selector, span_field, unparse_selector
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex

SYNTAX = """
// drop heads <query heads> of <selector>: head numbers of the original model, 0-based
drop_heads_stmt: "drop" "heads" LAYER_LIST "of" selector
"""


@dataclass(frozen=True)
class DropHeadsStmt:
    """`drop heads <heads> of <selector>`."""

    heads: LayerList
    selector: Selector
    span: Span = span_field()


def _build(ast, meta, children) -> DropHeadsStmt:
    token, selector = children
    return DropHeadsStmt(heads=ast.layer_list(meta, [token]), selector=selector, span=ast.span(meta))


NODES = (DropHeadsStmt,)
GRAMMAR = ("drop_heads_stmt",)
BUILDERS = {"drop_heads_stmt": _build}


@dataclass(frozen=True)
class ResolvedDropHeads:
    """A drop-heads statement: sorted original head and layer numbers."""

    heads: tuple[int, ...]
    layers: tuple[int, ...]
    statement: DropHeadsStmt


def unparse(statement: DropHeadsStmt) -> str:
    """Canonical text."""
    heads = unparse_selector(statement.heads)[len("layers ") :]
    return f"drop heads {heads} of {unparse_selector(statement.selector)}"


def check(c: Checker, index: ModelIndex, done: dict) -> list[ResolvedDropHeads]:
    """Heads in range, each key/value head losing as many query heads as the others, and a Q
    norm per head (surgery/analysis/head_rules.py); explicit layers; a layer's heads dropped by one
    statement at most."""
    resolved: list[ResolvedDropHeads] = []
    taken: dict[int, DropHeadsStmt] = {}
    qk_norm = architectures.lookup(index.architecture).attention.qk_norm
    for statement in c.recipe.statements:
        if not isinstance(statement, DropHeadsStmt):
            continue
        if isinstance(statement.selector, ImportanceSelector):
            c.error("drop heads takes explicit layers", statement.selector.span, "e.g. `of layers 3..5`")
            continue
        heads = _heads(c, statement.heads, index.num_heads)
        layers = c.attention_selector(statement.selector, index, "drop heads")
        if heads is None or layers is None:
            continue
        shape = f"the model has {index.num_heads} query heads sharing {index.num_kv_heads} key/value heads"
        for problem in head_problems(heads, index.num_heads, index.num_kv_heads, qk_norm, index.latent_attention):
            c.error(f"cannot drop query heads {format_layers(heads)}: {problem}", statement.heads.span, shape)
        again = sorted(layer for layer in layers if layer in taken)
        if again:
            lines = sorted({taken[layer].span.line for layer in again})
            c.error(f"the heads of layer(s) {format_layers(again)} are already dropped on line "
                    f"{', '.join(map(str, lines))}", statement.selector.span,
                    "head numbers are the original model's: list every head of a layer in one statement")  # fmt: skip
            continue
        taken.update({layer: statement for layer in layers})
        resolved.append(ResolvedDropHeads(heads, layers, statement))
    return resolved


def _heads(c: Checker, heads: LayerList, count: int) -> tuple[int, ...] | None:
    """The head numbers of a list (None, with errors, where one is out of range or reversed)."""
    chosen: list[int] = []
    ok = True
    hint = f"the model has {count} query heads per layer: 0..{count - 1}"
    for item in heads.items:
        first, last = (item, item) if isinstance(item, LayerIndex) else (item.start, item.end)
        for bound in dict.fromkeys((first, last)):
            if not 0 <= bound.value < count:
                c.error(f"head {bound.value} is out of range", bound.span, hint)
                ok = False
        if ok and first.value > last.value:
            c.error(f"reversed range {first.value}..{last.value}", item.span, "ranges run from low to high")
            ok = False
        if ok:
            chosen.extend(range(first.value, last.value + 1))
    repeated = sorted(head for head, times in Counter(chosen).items() if times > 1)
    if repeated:
        c.warning(f"head(s) {format_layers(repeated)} listed more than once", heads.span)
    return tuple(sorted(set(chosen))) if ok else None


def plan(state: PlanState) -> list[PlanStep]:
    """One step per statement, on the layers whose attention is still there."""
    steps = []
    for drop in state.checked.of("heads"):
        layers = tuple(layer for layer in drop.layers if layer in state.attention)
        note = "" if layers else "no effect: the attention of every selected layer was dropped"
        steps.append(
            DropHeadsStep(
                action="drop heads",
                phase="graph",
                parameters={"heads": list(drop.heads), "layers": list(layers)},
                layers=layers,
                targets=tuple(state.checked.index.part_path(layer, "attention") for layer in layers),
                source=drop.statement.span,
                note=note,
            )
        )
    return steps


@dataclass(frozen=True)
class DropHeadsStep(GraphPassStep):
    """A `drop heads` step: its graph pass (passes/drop_heads.py) over its layers."""

    def describe(self) -> str:
        """One line for `surgery plan`."""
        heads = format_layers(self.parameters["heads"])
        return f"drop query heads {heads} of layers {format_layers(self.layers)}"

    def run(self, run: Run) -> PlanStep | None:
        """Slice the heads' Q rows and O columns, a layer at a time where the weights stream."""
        from surgery.passes.drop_heads import DropHeads

        return run.graph_pass(self, DropHeads.from_step(self))
