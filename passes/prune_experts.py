"""`prune experts <selector> to M [by frequency]`: keep each layer's M most used experts.

Graph effect: in each selected MoE layer, the experts not kept and their router rows are
removed; the router's softmax and top-k then run over the M that remain, and top_k becomes
min(top_k, M). Which experts are kept is decided at apply time from how often the router
chose each one on the calibration data (counted after the statements before this one), and
recorded in the pass parameters and the report. Why: expert weights dominate an MoE's memory,
and rarely used experts cost the most memory per unit of output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from surgery.analysis.experts import expert_count, keep_experts
from surgery.ir.graph import DecoderGraph
from surgery.passes.base import GraphPass, PassResult


@dataclass(frozen=True)
class PruneExperts(GraphPass):
    """Keep `kept[i][1]` (original expert numbers) in layer `kept[i][0]`."""

    name: ClassVar[str] = "prune experts"
    preserves_semantics: ClassVar[bool] = False
    kept: tuple[tuple[int, tuple[int, ...]], ...]

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer has an MoE MLP with every kept expert, and keeps at least one."""
        problems = []
        for index, experts in self.kept:
            layer = graph.layer(index)
            count = expert_count(layer.mlp) if layer is not None and layer.mlp is not None else 0
            if not count:
                problems.append(f"layer {index} has no experts")
            elif hasattr(layer.mlp, "group_of"):
                problems.append(f"layer {index}: its experts are merged; prune before merging")
            elif not experts or not all(0 <= e < count for e in experts):
                problems.append(f"layer {index}: experts {list(experts)} are not a subset of 0..{count - 1}")
        return problems

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Slice the router and the stacked expert weights."""
        for index, experts in self.kept:
            keep_experts(graph.layer(index).mlp, experts)
        return PassResult(True, self.summary())

    def summary(self) -> str:
        """What the pass does, in one line."""
        sizes = sorted({len(experts) for _, experts in self.kept})
        return f"kept {', '.join(map(str, sizes))} experts in {len(self.kept)} layer(s)"

    def layer_passes(self) -> list[tuple[int, PruneExperts]]:
        """The pass as one pass per layer, each touching only that layer's weights (run a layer
        at a time on a lazily loaded model: `surgery.executor.graph_passes.run_on_graph`)."""
        return [(index, PruneExperts(kept=((index, experts),))) for index, experts in self.kept]

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """Each layer has exactly its kept experts, and top_k fits."""
        problems = []
        for index, experts in self.kept:
            mlp = graph.layer(index).mlp
            if expert_count(mlp) != len(experts) or mlp.gate.weight.shape[0] != len(experts):
                problems.append(f"layer {index} does not have {len(experts)} experts")
            elif mlp.gate.top_k > len(experts):
                problems.append(f"layer {index}: top_k {mlp.gate.top_k} exceeds its {len(experts)} experts")
        return problems
