"""`drop mlp <selector>`: remove the MLP sub-block of the selected layers.

Graph effect: in each selected layer the post-attention RMSNorm and the MLP go away and the
residual after attention is the layer's output (`h = m`). The layer's attention and KV cache
stay. Why: LLM-Drop's MLP similarity finds MLPs whose update barely changes the residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from surgery.ir.graph import DecoderGraph
from surgery.passes.base import GraphPass, PassResult, parts_present


@dataclass(frozen=True)
class DropMlp(GraphPass):
    """Remove the MLP (and its input norm) from the given original layers."""

    name: ClassVar[str] = "drop mlp"
    preserves_semantics: ClassVar[bool] = False
    layers: tuple[int, ...]

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer is still in the graph with its MLP."""
        return parts_present(graph, self.layers, "mlp")

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Remove the MLP and its norms from each selected layer."""
        for index in self.layers:
            graph.layer(index).drop_mlp()
        return PassResult(True, f"dropped the MLP in {len(self.layers)} layer(s)")

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """None of the selected layers has an MLP any more."""
        return [
            f"layer {i} still has its MLP"
            for i in self.layers
            if (layer := graph.layer(i)) is not None and layer.has_mlp
        ]
