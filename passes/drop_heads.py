"""`drop heads <heads> of <selector>`: remove query heads from the attention of the selected layers.

Graph effect: in each selected layer the query projection loses the rows of the dropped heads
(and their bias) and the output projection the matching columns; the layer's head count falls
by as many. Key/value heads are kept, and so is the KV cache: each key/value head must keep as
many query heads as the others (grouped-query attention maps query head h to key/value head
h // group), which `check` enforces. Why: attention heads are known to be redundant in large
numbers (Michel et al., "Are Sixteen Heads Really Better than One?"); a dropped head saves its
share of the Q and O projections and of the attention compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from surgery.analysis.head_rules import head_problems
from surgery.ir.graph import DecoderGraph
from surgery.nodes.latent_attention import LatentAttention
from surgery.passes.base import GraphPass, PassResult


@dataclass(frozen=True)
class DropHeads(GraphPass):
    """Remove query heads `heads` (the original model's head numbers) in each of `layers`."""

    name: ClassVar[str] = "drop heads"
    preserves_semantics: ClassVar[bool] = False
    layers: tuple[int, ...]
    heads: tuple[int, ...]

    @classmethod
    def from_step(cls, step) -> DropHeads:
        """The pass a `drop heads` plan step asks for."""
        return cls(layers=step.layers, heads=tuple(step.parameters["heads"]))

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer has attention with all its original heads, and every key/value head keeps
        the same number of query heads (at least one)."""
        problems = []
        for index in self.layers:
            layer = graph.layer(index)
            if layer is None or layer.attention is None:
                problems.append(f"layer {index} has no attention")
                continue
            attention = layer.attention
            if getattr(attention, "dropped_heads", ()):
                problems.append(f"layer {index}: heads were dropped already")
            rule = head_problems(self.heads, attention.num_heads, attention.num_kv_heads, attention.qk_norm,
                                 latent=isinstance(attention, LatentAttention))  # fmt: skip
            problems += [f"layer {index}: {problem}" for problem in rule]
        return problems

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Slice each layer's Q rows and O columns."""
        for index in self.layers:
            drop_query_heads(graph.layer(index).attention, self.heads)
        return PassResult(True, self.summary())

    def summary(self) -> str:
        """What the pass does, in one line."""
        return f"dropped {len(self.heads)} query head(s) in {len(self.layers)} layer(s)"

    def layer_passes(self) -> list[tuple[int, DropHeads]]:
        """One pass per layer (run a layer at a time on a lazily loaded model)."""
        return [(index, DropHeads(layers=(index,), heads=self.heads)) for index in self.layers]

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """Each layer's projections have the shapes of its remaining heads."""
        problems = []
        for index in self.layers:
            attention = graph.layer(index).attention
            width = attention.num_heads * attention.head_dim
            if attention.q_proj.weight.shape[0] != width or attention.o_proj.weight.shape[1] != width:
                problems.append(f"layer {index}: projections do not match {attention.num_heads} heads")
        return problems


@torch.no_grad()
def drop_query_heads(attention, heads: tuple[int, ...]) -> None:
    """Remove query heads `heads` from an attention node: Q rows (and bias), O columns."""
    size = attention.head_dim
    kept = [h for h in range(attention.num_heads) if h not in set(heads)]
    rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept])
    q, o = attention.q_proj, attention.o_proj
    attention.q_proj = _linear(q.weight[rows], q.bias[rows] if q.bias is not None else None)
    attention.o_proj = _linear(o.weight[:, rows], o.bias)
    if getattr(attention, "sinks", None) is not None:  # gpt-oss: each head's sink logit goes with it
        attention.sinks = torch.nn.Parameter(attention.sinks[kept].contiguous(), requires_grad=False)
    attention.num_heads = len(kept)
    attention.dropped_heads = tuple(sorted(heads))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """A new `nn.Linear` holding `weight` and `bias`. A bias that is already a parameter (the
    output projection's, unchanged) is the model's own, not a copy."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    if isinstance(bias, torch.nn.Parameter):
        layer.bias = bias
    elif bias is not None:
        layer.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=False)
    return layer
