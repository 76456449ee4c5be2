"""`fuse layer N|auto|dynamic into head [weight A] [candidates a..b]`: Layer Fused Decoding.

Graph effect: the head reads `(1 - A) FinalNorm(h_last) + A FinalNorm(h_N)` instead of
`FinalNorm(h_last)`: one extra RMSNorm (the final norm's gain, on layer N's output) and one
add before the head; logits are the same mix of the two logit-lens readouts because the head
is linear. `dynamic` fuses, per token, the candidate layer whose MLP changed the logit-lens
distribution least (lowest IKS, computed in the graph). Why: intermediate layers of the latter
half carry in-context knowledge that the last layers override with parametric knowledge (LFD,
arXiv 2508.19614); mixing one back in makes answers follow the given context more. `auto`
is resolved by the plan to a static layer from calibration IKS. Definitions: surgery/nodes/fusion.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from surgery.ir.graph import DecoderGraph
from surgery.nodes.fusion import HeadFusion
from surgery.passes.base import GraphPass, PassResult


@dataclass(frozen=True)
class Fuse(GraphPass):
    """Fuse `layers` (one layer, or the dynamic candidates) into the head at `weight`."""

    name: ClassVar[str] = "fuse"
    preserves_semantics: ClassVar[bool] = False
    layers: tuple[int, ...]
    weight: float
    dynamic: bool = False

    @classmethod
    def from_step(cls, step: Any) -> Fuse:
        """From a plan step: its layers, weight and mode."""
        return cls(layers=step.layers, weight=step.parameters["weight"], dynamic=step.parameters["mode"] == "dynamic")

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer is still in the graph and is not the last one; dynamic candidates have an MLP."""
        problems = []
        last = graph.layers[-1].index
        for index in self.layers:
            layer = graph.layer(index)
            if layer is None:
                problems.append(f"layer {index} is not in the graph (its block was dropped)")
            elif index == last:
                problems.append(f"layer {index} is the last layer: fusing it into the head changes nothing")
            elif self.dynamic and not layer.has_mlp:
                problems.append(f"layer {index} has no MLP, so its IKS is not defined")
        if not self.layers or (not self.dynamic and len(self.layers) != 1):
            problems.append("static fusion takes exactly one layer; dynamic at least one")
        if not 0 <= self.weight <= 1:
            problems.append(f"weight {self.weight} is not in [0, 1]")
        if graph.fusion is not None:
            problems.append("the head already fuses a layer")
        return problems

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Record the fusion on the graph; the reference forward and the exporter read it."""
        graph.fusion = HeadFusion(tuple(self.layers), float(self.weight), self.dynamic)
        kind = f"per token among layers {list(self.layers)}" if self.dynamic else f"layer {self.layers[0]}"
        return PassResult(True, f"fused {kind} into the head at weight {self.weight:g}")

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """The graph carries exactly this fusion."""
        expected = HeadFusion(tuple(self.layers), float(self.weight), self.dynamic)
        return [] if graph.fusion == expected else ["the head fusion was not recorded"]
