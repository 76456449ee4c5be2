"""`merge experts <selector> to M [grouping output|router] [weighting frequency|uniform] [rank R|P%]`.

Graph effect: in each selected mixture-of-experts layer the N experts become M merged experts,
one per group: the members' intermediate neurons permuted to match the group's most used
member (MC-SMoE's alignment; an expert's neuron order is arbitrary), then their weights averaged
(by usage frequency on the calibration data, or uniformly). With `rank`, each merged expert
keeps the top-`rank` left singular subspace of its members' weights side by side (Sub-MoE's
shared subspace) and is stored as two factors, which is what saves bytes. The router keeps
its N rows: it takes top-k over the N original logits, maps each chosen expert to its group,
and adds the weights that land on one group (as MC-SMoE, HC-SMoE and Sub-MoE do). With M = N
every group is one expert and the layer is unchanged. Groups and weights are decided from
calibration statistics (surgery/analysis/experts.py) when the graph steps run (`plan` and `apply`) and
recorded in the plan, the pass parameters and the report. Why: experts dominate an MoE's memory; merging
similar experts keeps more of their function than deleting them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from surgery.analysis.expert_rules import rank_problem
from surgery.analysis.experts import MergedMoE, expert_count, full_rank
from surgery.ir.graph import DecoderGraph
from surgery.passes.base import GraphPass, PassResult


@dataclass(frozen=True)
class MergeExperts(GraphPass):
    """`merges`: per layer, (layer, groups of original experts, each member's weight within its group)."""

    name: ClassVar[str] = "merge experts"
    preserves_semantics: ClassVar[bool] = False
    merges: tuple[tuple[int, tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]], ...]
    rank: int | None = None  # Sub-MoE shared-subspace truncation of each merged expert
    align: bool = True  # permute members' neurons to match the group's first member before averaging

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer has experts, and its groups partition them."""
        problems = []
        for index, groups, weights in self.merges:
            layer = graph.layer(index)
            count = expert_count(layer.mlp) if layer is not None and layer.mlp is not None else 0
            if not count:
                problems.append(f"layer {index} has no experts")
                continue
            if sorted(e for g in groups for e in g) != list(range(count)):
                problems.append(f"layer {index}: the groups do not partition its {count} experts")
            if [len(g) for g in groups] != [len(w) for w in weights]:
                problems.append(f"layer {index}: one weight per group member is needed")
            if isinstance(layer.mlp, MergedMoE):
                problems.append(f"layer {index} is already merged")
            elif self.rank is not None:
                limit = full_rank(layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
                problem = rank_problem(limit, self.rank)
                if problem:
                    problems.append(f"layer {index}: {problem}")
        return problems

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Replace each layer's MoE by its merged form."""
        for index, groups, weights in self.merges:
            layer = graph.layer(index)
            layer.mlp = MergedMoE(
                layer.mlp, [list(g) for g in groups], [list(w) for w in weights], self.align, self.rank
            ).eval()
        return PassResult(True, self.summary())

    def summary(self) -> str:
        """What the pass does, in one line."""
        sizes = sorted({len(groups) for _, groups, _ in self.merges})
        return f"merged experts into {', '.join(map(str, sizes))} groups in {len(self.merges)} layer(s)"

    def layer_passes(self) -> list[tuple[int, MergeExperts]]:
        """The pass as one pass per layer, each touching only that layer's weights (run a layer
        at a time on a lazily loaded model: `surgery.executor.graph_passes.run_on_graph`)."""
        return [(merge[0], replace(self, merges=(merge,))) for merge in self.merges]

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """Each layer has as many experts as groups."""
        return [
            f"layer {index} does not have {len(groups)} experts"
            for index, groups, _ in self.merges
            if expert_count(graph.layer(index).mlp) != len(groups)
        ]
