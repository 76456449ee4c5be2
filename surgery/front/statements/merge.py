"""`merge experts <selector> to M [grouping output|router] [weighting frequency|uniform]
[rank R|P%]`: group each layer's experts into M and merge each group (docs/moe.md). Grammar:
`merge_stmt`. Pass: passes/merge_experts.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery.analysis.expert_rules import merge_problem
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
class MergeStmt:
    """`merge experts <selector> to M [grouping output|router] [weighting frequency|uniform] [rank R|P%]`."""

    selector: Selector
    groups: int
    grouping: str = "output"
    weighting: str = "frequency"
    rank: int | None = None
    rank_percent: float | None = None
    span: Span = span_field()
    rank_span: Span | None = None


@dataclass(frozen=True)
class ResolvedMerge:
    """A merge statement: the layers, how many groups, and how to group and weight."""

    layers: tuple[int, ...]
    groups: int
    grouping: str
    weighting: str
    statement: MergeStmt
    rank: int | None = None  # Sub-MoE truncation: an absolute rank, or
    rank_percent: float | None = None  # a share of an expert's full rank


NODES = (MergeStmt,)
GRAMMAR = ("merge_stmt",)

SYNTAX = """
// merge experts <selector> to M [grouping output|router] [weighting frequency|uniform] [rank R|P%]
merge_stmt: "merge" "experts" selector "to" INT merge_option*
?merge_option: "grouping" GROUPING   -> grouping_option
             | "weighting" WEIGHTING -> weighting_option
             | "rank" (PERCENT | INT) -> rank_option
GROUPING: "output" | "router"
WEIGHTING: "frequency" | "uniform"
"""

def _merge_stmt(ast, meta, children) -> MergeStmt:
    selector, groups, *options = children
    return MergeStmt(selector=selector, groups=int(groups), span=ast.span(meta), **ast.options(options))


def _rank_option(ast, meta, children) -> dict:
    (token,) = children
    if token.type == "PERCENT":
        return {"rank_percent": float(token[:-1]), "rank_span": ast.tok(token)}
    return {"rank": int(token), "rank_span": ast.tok(token)}


BUILDERS = {
    "merge_stmt": _merge_stmt,
    "grouping_option": lambda ast, meta, children: {"grouping": str(children[0])},
    "weighting_option": lambda ast, meta, children: {"weighting": str(children[0])},
    "rank_option": _rank_option,
}


def unparse(statement: MergeStmt) -> str:
    """Canonical text."""
    return (
        f"merge experts {unparse_selector(statement.selector)} to {statement.groups} "
        f"grouping {statement.grouping} weighting {statement.weighting}"
        + (f" rank {statement.rank}" if statement.rank is not None else "")
        + (f" rank {statement.rank_percent:g}%" if statement.rank_percent is not None else "")
    )


def check(c: Checker, index: ModelIndex, done: dict) -> list[ResolvedMerge]:
    """Each merge: layer numbers with experts, a group count and a rank they can take."""
    resolved = []
    for statement in c.recipe.statements:
        if not isinstance(statement, MergeStmt):
            continue
        available = expert_total(c, statement, "merge", index, done["split"])
        if available is None:
            continue
        problem = merge_problem(available, statement.groups)
        if problem:
            c.error(problem, statement.span, f"use 1..{available}")
            continue
        if statement.rank is not None and statement.rank < 1:
            c.error("rank 0 keeps nothing", statement.rank_span, "use a rank of at least 1, or a percentage")
            continue
        if statement.rank_percent is not None and not 0 < statement.rank_percent < 100:
            c.error(
                f"rank {statement.rank_percent:g}% is not a truncation",
                statement.rank_span,
                "use a share of the full rank in (0%, 100%); leave `rank` out to keep it",
            )
            continue
        layers = c.selector(statement.selector, index)
        if layers is not None:
            resolved.append(
                ResolvedMerge(
                    layers,
                    statement.groups,
                    statement.grouping,
                    statement.weighting,
                    statement,
                    statement.rank,
                    statement.rank_percent,
                )
            )
    return resolved


def plan(state: PlanState) -> list[PlanStep]:
    """One step per merge; its groups come from statistics counted when it runs."""
    steps = []
    for merge in state.checked.of("merge"):
        layers = tuple(layer for layer in merge.layers if layer in state.mlp)
        parameters = {"groups": merge.groups, "grouping": merge.grouping, "weighting": merge.weighting}
        if merge.rank is not None:
            parameters["rank"] = merge.rank
        if merge.rank_percent is not None:
            parameters["rank_percent"] = merge.rank_percent
        note = f"groups: from statistics {state.counted}"
        index, span = state.checked.index, merge.statement.span
        steps.append(mlp_step(MergeStep, index, "merge experts", layers, parameters, span, note))
    return steps


@dataclass(frozen=True)
class MergeStep(GraphPassStep):
    """A `merge experts` step: its groups come from statistics counted when it runs."""

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        rank = ""
        if "rank" in p or "rank_percent" in p:
            asked = f"{p['rank_percent']:g}% of full rank" if "rank_percent" in p else str(p["rank"])
            rank = f", shared subspace of rank {asked}" + (f" = {p['resolved_rank']}" if "resolved_rank" in p else "")
        return (
            f"merge experts of layers {format_layers(self.layers)} into {p['groups']} groups "
            f"(grouping by {p['grouping']}, {p['weighting']}-weighted, neurons aligned{rank})"
        )

    def run(self, run: Run) -> PlanStep | None:
        """Count expert use (and outputs) on the calibration tokens, group and merge the experts;
        returns the step with the groups (and rank) filled in."""
        from surgery.executor.experts import merge_by_statistics

        if not self.layers:
            return None
        graph_pass, record = merge_by_statistics(run, self)
        resolution = {"resolved_groups": record["groups"]}
        if graph_pass.rank is not None:
            resolution["resolved_rank"] = graph_pass.rank
        return run.graph_pass(self, graph_pass, resolution, record)
