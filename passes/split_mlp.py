"""`split mlp <selector> into E experts top K`: refactor dense MLPs into mixtures of experts.

Graph effect: each selected layer's SwiGLU MLP becomes a `SplitMoE` (surgery/analysis/moe.py): its
intermediate neurons partitioned into E equal groups (balanced k-means on the gate rows), one
expert per group, and a router derived from the weights that sends each token to its K
highest-scoring experts with weight 1. With K = E every neuron runs and the layer computes
exactly what the dense MLP did; with K < E each token runs K/E of the MLP. Why: this turns a
dense model into a real-weights MoE (the Read-ME line of work) that expert merging and
pruning can then act on, and that a sparse runtime can run at a fraction of the MLP cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from surgery.analysis.moe import SplitMoE, split_mlp
from surgery.ir.graph import DecoderGraph
from surgery.nodes.mlp import GatedMLP
from surgery.passes.base import GraphPass, PassResult, parts_present


@dataclass(frozen=True)
class SplitMlp(GraphPass):
    """Split the dense MLP of each of `layers` into `experts` experts, `top_k` per token."""

    name: ClassVar[str] = "split mlp"
    preserves_semantics: ClassVar[bool] = False  # True only when top_k == experts
    layers: tuple[int, ...]
    experts: int
    top_k: int

    @classmethod
    def from_step(cls, step: Any) -> SplitMlp:
        """From a plan step: its layers, expert count and top-k."""
        return cls(layers=step.layers, experts=step.parameters["experts"], top_k=step.parameters["top_k"])

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer has a dense SwiGLU MLP whose width the expert count divides."""
        problems = parts_present(graph, self.layers, "mlp")
        for index in self.layers:
            layer = graph.layer(index)
            if layer is None or layer.mlp is None:
                continue
            if not isinstance(layer.mlp, GatedMLP) or layer.mlp.activation != "silu":
                problems.append(f"layer {index}'s MLP is not a dense SwiGLU MLP")
            elif layer.mlp.gate_proj.out_features % self.experts:
                problems.append(
                    f"layer {index}: {layer.mlp.gate_proj.out_features} neurons do not split into {self.experts}"
                )
        if not 1 <= self.top_k <= self.experts:
            problems.append(f"top {self.top_k} is not in 1..{self.experts}")
        return problems

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Replace each MLP by its split."""
        for index in self.layers:
            layer = graph.layer(index)
            layer.mlp = split_mlp(layer.mlp, self.experts, self.top_k).eval()
        return PassResult(True, f"split {len(self.layers)} MLP(s) into {self.experts} experts, top {self.top_k}")

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """Every selected layer now has a SplitMoE of the asked shape."""
        problems = []
        for index in self.layers:
            mlp = graph.layer(index).mlp
            if not isinstance(mlp, SplitMoE) or mlp.experts.gate_up_proj.shape[0] != self.experts:
                problems.append(f"layer {index} was not split")
        return problems
