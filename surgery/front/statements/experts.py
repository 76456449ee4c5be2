"""Rules that span the expert statements (split, prune, merge), written once for `check` and
the plan: what each layer's experts can take, and the shape of their plan steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.analysis.expert_rules import full_rank, merge_problem, merge_rank, prune_problem, rank_problem
from surgery.diagnostics import Diagnostic
from surgery.front.plan_step import PlanStep
from surgery.front.selectors import (
    ImportanceSelector,
)
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker
    from surgery.models.index import ModelIndex


def expert_total(c: Checker, statement, verb: str, index: ModelIndex, splits) -> int | None:
    """How many experts a prune or merge statement acts on; None (with an error) when it cannot act."""
    if isinstance(statement.selector, ImportanceSelector):
        c.error(f"{verb} experts takes layer numbers", statement.selector.span, "e.g. `layers *`")
        return None
    available = index.num_experts or max((s.experts for s in splits), default=0)
    if not available:
        c.error(
            f"this model has no experts to {verb}",
            statement.span,
            f"{verb} a mixture-of-experts model, or `split mlp ... into E experts` first",
        )
        return None
    return available


UNMODELLED_EXPERTS = {
    "topk_softmax_clamped": "biased, with a clamped SwiGLU",  # gpt-oss
    "softmax_topk_scaled": "scaled routing weights and always-on shared experts",  # DeepSeek
    "sparsemixer": "routed by SparseMixer, not a softmax top-k",  # Phi-MoE
    "sigmoid_biased": "routed by sigmoid scores chosen with a bias, not a softmax top-k",  # LFM2-MoE
}


def check_expert_layers(c: Checker, index: ModelIndex, splits: list, prunes: list, merges: list) -> None:
    """Per layer, what the prunes and merges find there (see `expert_layer_problems`).

    Layers that a split chooses by importance are decided by the plan, with the same rules.
    """
    if index.is_moe:
        split_layers: dict[int, int] = {}
    else:
        split_layers = {}
        for split in splits:
            for layer in split.layers:
                if layer in split_layers:
                    c.error(f"layer {layer} is split twice", split.statement.span, "split each MLP once")
                split_layers[layer] = split.experts
    undecided = any(split.query is not None for split in splits)
    c.diagnostics.extend(expert_layer_problems(index, split_layers, prunes, merges, undecided))


def expert_layer_problems(
    index: ModelIndex,
    split_layers: dict[int, int],
    prunes: tuple | list,
    merges: tuple | list,
    undecided: bool = False,
) -> list[Diagnostic]:
    """Errors for prunes and merges that a layer's experts cannot take.

    `split_layers` maps each layer split into experts to its expert count (ignored for a MoE
    model, whose every layer has the config's experts). Each layer is followed through the
    prunes (which run first) and the merges: a layer without experts, a count to keep or merge
    to that the layer does not have, a rank its experts cannot have. With `undecided` (splits
    chosen by importance are not resolved yet), layers without experts are not reported.
    """
    if index.is_moe and index.moe_router != "softmax_topk":
        # Experts the pruning and merging arithmetic does not model (it rebuilds plain softmax top-k MoEs).
        why = UNMODELLED_EXPERTS[index.moe_router]
        return [Diagnostic("error", f"{index.architecture}'s experts ({why}) cannot be "
                           f"{'pruned' if hasattr(r, 'keep') else 'merged'} yet", r.statement.span,
                           "drop its attention, or drop whole layers' MLPs instead")
                for r in [*prunes, *merges]]  # fmt: skip
    if index.is_moe:
        layout = {layer: (index.num_experts, index.expert_intermediate_size) for layer in range(index.num_layers)}
    else:
        layout = {layer: (n, index.intermediate_size // n) for layer, n in split_layers.items()}
    problems: list[Diagnostic] = []
    pruned_by: dict[int, Span] = {}
    merged_by: dict[int, Span] = {}
    for resolved in [*prunes, *merges]:
        statement, layers = resolved.statement, resolved.layers
        pruning = hasattr(resolved, "keep")  # a prune (a merge has groups)
        missing = [layer for layer in layers if layer not in layout]
        if missing and not undecided:
            problems.append(
                Diagnostic(
                    "error",
                    f"layer(s) {format_layers(missing)} have no experts to {'prune' if pruning else 'merge'}",
                    statement.selector.span,
                    "split those MLPs into experts first (`split mlp layers ... into E experts top K`)",
                )
            )
        if not pruning:
            twice = [layer for layer in layers if layer in merged_by]
            if twice:
                first = merged_by[twice[0]]
                problems.append(
                    Diagnostic(
                        "error",
                        f"layer(s) {format_layers(twice)} are merged twice",
                        statement.selector.span,
                        f"already merged at {first.location()}; merge each layer's experts once",
                    )
                )
            for layer in layers:
                merged_by.setdefault(layer, statement.span)
        found: dict[tuple[str, Span | None, str | None], list[int]] = {}
        for layer in layers:
            if layer not in layout or (not pruning and merged_by[layer] is not statement.span):
                continue
            experts, width = layout[layer]
            hint = None
            if pruning:
                problem, span = prune_problem(experts, resolved.keep), statement.span
            elif layer in pruned_by and resolved.groups > experts:
                problem = f"cannot merge into {resolved.groups} groups the {experts} experts that pruning keeps"
                span = statement.span
                hint = f"pruned first (at {pruned_by[layer].location()}); merge to at most {experts}"
            else:
                problem, span = merge_problem(experts, resolved.groups), statement.span
                if problem is None and (resolved.rank is not None or resolved.rank_percent is not None):
                    full = full_rank(index.hidden_size, width)
                    problem = rank_problem(full, merge_rank(full, resolved.rank, resolved.rank_percent))
                    span = statement.rank_span or statement.span
            if problem:
                found.setdefault((problem, span, hint), []).append(layer)
        for (problem, span, hint), where in found.items():
            if hint:  # the layers lead the hint: the message is the same for every layer
                problems.append(Diagnostic("error", problem, span, f"layer(s) {format_layers(where)} are {hint}"))
            else:
                problems.append(Diagnostic("error", f"{problem} (layer(s) {format_layers(where)})", span))
        if pruning:
            for layer in layers:
                if layer in layout:
                    layout[layer] = (resolved.keep, layout[layer][1])
                    pruned_by[layer] = statement.span
    return problems


def mlp_step(kind: type[PlanStep], index, action: str, layers: tuple[int, ...], parameters: dict, source,
             note: str) -> PlanStep:  # fmt: skip
    """A graph step of `kind` acting on the MLPs of `layers` (split, merge, prune)."""
    return kind(
        action=action,
        phase="graph",
        parameters={"layers": list(layers), **parameters},
        layers=layers,
        targets=tuple(index.part_path(layer, "mlp") for layer in layers),
        source=source,
        note=note,
    )
