"""The statistics prune and merge experts decide by: counted on the calibration tokens, on the
model as the steps before leave it, one layer at a time on the run's device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.progress import counted

if TYPE_CHECKING:
    from surgery.executor.run import Run
    from surgery.front.plan_step import PlanStep


def _rounded(frequencies: dict[int, list[float]]) -> dict[str, list[float]]:
    return {str(layer): [round(f, 6) for f in values] for layer, values in frequencies.items()}


def merge_by_statistics(run: Run, step: PlanStep):
    """The merge pass for a step: usage and output statistics on the calibration data, then
    groups; and the report's record of them."""
    from surgery.analysis.expert_rules import merge_rank
    from surgery.analysis.experts import expert_statistics, full_rank, group_by_outputs, group_by_router
    from surgery.passes import MergeExperts

    graph, p = run.graph, step.parameters
    what = "expert use and outputs" if p["grouping"] == "output" else "expert use"
    tokens = run.calibration_tokens()
    with counted(run.progress, f"counting {what} on {run.checked.calibration.describe()}", len(graph.layers), "layer"):
        frequencies, outputs = expert_statistics(
            graph, step.layers, tokens, outputs=p["grouping"] == "output", device=run.settings.device
        )
    rank = p.get("rank")
    if "rank_percent" in p:  # every layer's experts have one shape (one model, or one split)
        experts = graph.layer(step.layers[0]).mlp.experts
        rank = merge_rank(full_rank(experts.gate_up_proj, experts.down_proj), None, p["rank_percent"])
    merges = []
    for layer in step.layers:
        freq = frequencies[layer]
        if p["grouping"] == "output":
            groups = group_by_outputs(outputs[layer], p["groups"])
        else:
            router = graph.layer(layer).mlp.gate
            with graph.materialized(router):  # a lazily loaded router is read for this only
                groups = group_by_router(router.weight.detach().float().numpy(), freq, p["groups"])
        # The most used member leads: the others' neurons are aligned to it before averaging.
        groups = [sorted(members, key=lambda e: (-freq[e], e)) for members in groups]
        weights = []
        for members in groups:
            total = sum(freq[e] for e in members)
            uniform = p["weighting"] == "uniform" or total == 0
            weights.append(tuple(1 / len(members) if uniform else freq[e] / total for e in members))
        merges.append((layer, tuple(tuple(g) for g in groups), tuple(weights)))
    record = {
        "frequencies": _rounded(frequencies),
        "groups": {str(layer): [list(g) for g in groups] for layer, groups, _ in merges},
    }
    return MergeExperts(merges=tuple(merges), rank=rank), record


def prune_by_frequency(run: Run, step: PlanStep):
    """The prune pass for a step: count expert use on the calibration data, keep the most used;
    and the report's record of the counts."""
    from surgery.analysis.experts import expert_frequencies, most_used
    from surgery.passes import PruneExperts

    tokens = run.calibration_tokens()
    with counted(run.progress, f"counting expert use on {run.checked.calibration.describe()}", len(run.graph.layers),
                 "layer"):  # fmt: skip
        frequencies = expert_frequencies(run.graph, step.layers, tokens, run.settings.device)
    kept = tuple((layer, most_used(frequencies[layer], step.parameters["keep"])) for layer in step.layers)
    return PruneExperts(kept=kept), {"frequencies": _rounded(frequencies)}
