"""`drop block <selector>`: remove whole decoder layers.

Graph effect: the selected layers leave the chain; the residual stream goes from the layer
before to the layer after. Their KV caches disappear and the remaining caches are renumbered.
Layers keep their original numbers, so later statements still refer to the original model.
Why: block dropping is the coarsest (and, per LLM-Drop, the most damaging) form of depth
pruning; it is the baseline the finer drops are compared against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from surgery.ir.graph import DecoderGraph
from surgery.passes.base import GraphPass, PassResult


@dataclass(frozen=True)
class DropBlock(GraphPass):
    """Remove the given original layers entirely."""

    name: ClassVar[str] = "drop block"
    preserves_semantics: ClassVar[bool] = False
    layers: tuple[int, ...]

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer is still in the graph, and one attention layer stays."""
        problems = [f"layer {i} is not in the graph" for i in self.layers if graph.layer(i) is None]
        remaining_attention = [i for i in graph.kv_layers() if i not in self.layers]
        if not remaining_attention:
            problems.append("the model would have no attention layer left")
        return problems

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Take the selected layers out of the chain."""
        dropped = set(self.layers)
        graph.layers = [layer for layer in graph.layers if layer.index not in dropped]
        return PassResult(True, f"dropped {len(dropped)} block(s)")

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """None of the selected layers is in the graph any more."""
        return [f"layer {i} is still in the graph" for i in self.layers if graph.layer(i) is not None]
