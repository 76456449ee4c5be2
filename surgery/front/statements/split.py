"""`split mlp <selector> into E experts top K`: a dense SwiGLU MLP becomes a mixture of experts
(surgery/analysis/moe.py). Grammar: `split_stmt`. Pass: passes/split_mlp.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgery.diagnostics import raise_if_errors
from surgery.front.plan_step import GraphPassStep, PlanStep
from surgery.front.selection import ImportanceQuery
from surgery.front.selectors import (
    ImportanceSelector,
    Selector,
    span_field,
    unparse_selector,
)
from surgery.front.statements.experts import expert_layer_problems, mlp_step
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex


@dataclass(frozen=True)
class SplitStmt:
    """`split mlp <selector> into E experts top K`."""

    selector: Selector
    experts: int
    top_k: int
    span: Span = span_field()


@dataclass(frozen=True)
class ResolvedSplit:
    """A split statement: explicit layers or an importance query, expert count and top-k."""

    layers: tuple[int, ...]
    experts: int
    top_k: int
    statement: SplitStmt
    query: ImportanceQuery | None = None


NODES = (SplitStmt,)
GRAMMAR = ("split_stmt",)

SYNTAX = """
// split mlp <selector> into E experts top K
split_stmt: "split" "mlp" selector "into" INT "experts" "top" INT
"""

def _split_stmt(ast, meta, children) -> SplitStmt:
    selector, experts, top_k = children
    return SplitStmt(selector=selector, experts=int(experts), top_k=int(top_k), span=ast.span(meta))


BUILDERS = {"split_stmt": _split_stmt}


def unparse(statement: SplitStmt) -> str:
    """Canonical text."""
    selector = unparse_selector(statement.selector)
    return f"split mlp {selector} into {statement.experts} experts top {statement.top_k}"


def check(c: Checker, index: ModelIndex, done: dict) -> list[ResolvedSplit]:
    """Each split: a SwiGLU dense MLP, an expert count that divides its width, a valid top-k."""
    resolved = []
    for statement in c.recipe.statements:
        if not isinstance(statement, SplitStmt):
            continue
        if index.is_moe:
            c.error("this model's MLPs are already mixtures of experts", statement.span)
            continue
        if index.mlp_activation != "silu":
            c.error(
                f"cannot split {index.architecture}'s MLPs: split experts are SwiGLU, this MLP's activation is "
                f"{index.hidden_act}",
                statement.span,
                "splitting works on SwiGLU MLPs (Llama, Mistral, Qwen, Phi-3, Granite, OLMo 2)",
            )
            continue
        ok = True
        if statement.experts < 2 or index.intermediate_size % statement.experts:
            c.error(
                f"cannot split {index.intermediate_size} MLP neurons into {statement.experts} equal experts",
                statement.span,
                "the expert count must be at least 2 and divide the MLP width "
                f"({', '.join(str(e) for e in range(2, 33) if index.intermediate_size % e == 0)})",
            )
            ok = False
        if not 1 <= statement.top_k <= statement.experts:
            c.error(f"top {statement.top_k} is not in 1..{statement.experts}", statement.span)
            ok = False
        selector = statement.selector
        if isinstance(selector, ImportanceSelector):
            query = c.importance(selector.rank, selector.source, "mlp", index, selector.span)
            if query is not None and ok:
                resolved.append(ResolvedSplit((), statement.experts, statement.top_k, statement, query))
            continue
        layers = c.selector(selector, index)
        if layers is not None and ok:
            resolved.append(ResolvedSplit(layers, statement.experts, statement.top_k, statement))
    return resolved


def plan(state: PlanState) -> list[PlanStep]:
    """One step per split, on the MLPs still there; importance-chosen layers checked like explicit ones."""
    checked = state.checked
    steps = []
    for split in checked.of("split"):
        extra: dict[str, Any] = {}
        if split.query is not None:
            layers, extra = state.select(split.query, sorted(state.mlp))
        else:
            layers = tuple(layer for layer in split.layers if layer in state.mlp)
        parameters = {"experts": split.experts, "top_k": split.top_k, **extra}
        note = "" if layers else "no effect: every selected MLP was dropped"
        steps.append(mlp_step(SplitStep, checked.index, "split mlp", layers, parameters, split.statement.span, note))
    if any(split.query is not None for split in checked.of("split")):
        # Which layers an importance-ranked split chose is known only now: the rules `check`
        # applied to explicit splits apply to these layers here.
        split_layers = {layer: step.parameters["experts"] for step in steps for layer in step.layers}
        raise_if_errors(expert_layer_problems(checked.index, split_layers, checked.of("prune"), checked.of("merge")))
    return steps


@dataclass(frozen=True)
class SplitStep(GraphPassStep):
    """A `split mlp` step: each dense MLP becomes a mixture of experts."""

    @property
    def needs_whole_model(self) -> bool:
        """The split rewrites weights across the model."""
        return True

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        exact = " (all experts: the dense MLP exactly)" if p["top_k"] == p["experts"] else ""
        return f"split mlp of layers {format_layers(self.layers)} into {p['experts']} experts, top {p['top_k']}{exact}"

