"""`drop attention <selector>`: remove the attention sub-block of the selected layers.

Graph effect: in each selected layer the input RMSNorm and the attention go away and the
residual passes straight to the MLP (`m = x`). The layer no longer has a KV cache: the
exported model has no past/present tensors for it, and the remaining caches are renumbered.
Why: LLM-Drop shows many attention layers are nearly redundant (their output barely changes
the residual), and each one dropped saves its compute and its share of KV-cache memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from surgery.ir.graph import DecoderGraph
from surgery.passes.base import GraphPass, PassResult, parts_present


@dataclass(frozen=True)
class DropAttention(GraphPass):
    """Remove attention (and its input norm) from the given original layers."""

    name: ClassVar[str] = "drop attention"
    preserves_semantics: ClassVar[bool] = False
    layers: tuple[int, ...]

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer is still in the graph with its attention, and one attention layer stays."""
        problems = parts_present(graph, self.layers, "attention")
        if len(graph.kv_layers()) - len(self.layers) < 1:
            problems.append("the model would have no attention layer left")
        return problems

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Remove the attention and its norms from each selected layer."""
        for index in self.layers:
            graph.layer(index).drop_attention()
        return PassResult(True, f"dropped attention in {len(self.layers)} layer(s)")

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """None of the selected layers has attention any more."""
        kept = set(graph.kv_layers())
        return [f"layer {i} still has attention" for i in self.layers if i in kept]
