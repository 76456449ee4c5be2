"""`prune experts <selector> to M [by frequency]`: keep each layer's M most used experts,
counted on the calibration data after the steps before. Grammar: `prune_stmt`. Pass:
passes/prune_experts.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery.analysis.expert_rules import prune_problem
from surgery.front.plan_step import GraphPassStep, PlanStep, Run
from surgery.front.selectors import (
    Selector,
    span_field,
    unparse_selector,
)
from surgery.front.statements.experts import expert_total, mlp_step
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex


@dataclass(frozen=True)
class PruneStmt:
    """`prune experts <selector> to M [by frequency]` (frequency is the only rule so far)."""

    selector: Selector
    keep: int
    span: Span = span_field()


@dataclass(frozen=True)
class ResolvedPrune:
    """A prune statement: the layers and how many experts each keeps."""

    layers: tuple[int, ...]
    keep: int
    statement: PruneStmt


NODES = (PruneStmt,)
GRAMMAR = ("prune_stmt",)

SYNTAX = """
// prune experts <selector> to M [by frequency]
prune_stmt: "prune" "experts" selector "to" INT prune_rule?
prune_rule: "by" "frequency"
"""

def _prune_stmt(ast, meta, children) -> PruneStmt:
    selector, keep = children[0], children[1]
    return PruneStmt(selector=selector, keep=int(keep), span=ast.span(meta))


BUILDERS = {"prune_stmt": _prune_stmt, "prune_rule": lambda ast, meta, children: None}


def unparse(statement: PruneStmt) -> str:
    """Canonical text."""
    return f"prune experts {unparse_selector(statement.selector)} to {statement.keep} by frequency"


def check(c: Checker, index: ModelIndex, done: dict) -> list[ResolvedPrune]:
    """Each prune: layer numbers of a model (or split) with experts, a count it can keep."""
    resolved = []
    for statement in c.recipe.statements:
        if not isinstance(statement, PruneStmt):
            continue
        available = expert_total(c, statement, "prune", index, done["split"])
        if available is None:
            continue
        problem = prune_problem(available, statement.keep)
        if problem:
            c.error(problem, statement.span, f"keep 1..{available - 1}")
            continue
        layers = c.selector(statement.selector, index)
        if layers is not None:
            resolved.append(ResolvedPrune(layers, statement.keep, statement))
    return resolved


def plan(state: PlanState) -> list[PlanStep]:
    """One step per prune (pruning runs before merging, so a merge groups the kept experts)."""
    steps = []
    for prune in state.checked.of("prune"):
        layers = tuple(layer for layer in prune.layers if layer in state.mlp)
        parameters = {"keep": prune.keep, "rule": "frequency"}
        note = f"which experts: the {prune.keep} most used per layer, {state.counted}"
        index, span = state.checked.index, prune.statement.span
        steps.append(mlp_step(PruneStep, index, "prune experts", layers, parameters, span, note))
    return steps


@dataclass(frozen=True)
class PruneStep(GraphPassStep):
    """A `prune experts` step: which experts stay is counted on the calibration data when it runs."""

    def describe(self) -> str:
        """One line for `surgery plan`."""
        return f"prune experts of layers {format_layers(self.layers)} to {self.parameters['keep']} by frequency"

    def run(self, run: Run) -> PlanStep | None:
        """Count expert use on the calibration tokens, keep the most used (rewrites a layer at a time
        on a streamed model); returns the step with the kept experts filled in."""
        from surgery.executor.experts import prune_by_frequency

        if not self.layers:
            return None
        graph_pass, record = prune_by_frequency(run, self)
        resolution = {"resolved_kept": {str(layer): list(kept) for layer, kept in graph_pass.kept}}
        return run.graph_pass(self, graph_pass, resolution, record)
