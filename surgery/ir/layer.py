"""A decoder layer: its nodes, and its topology written once.

A layer is two optional sub-blocks, attention then MLP; each adds
`scale * PostNorm(Body(PreNorm(residual)))` to the residual stream, with the norms the family
has (pre: Llama; post: OLMo 2; both: Gemma 3) and Granite's residual multiplier as the scale.
`walk_layer` states that order and nothing else. What a step *does* belongs to a
`ResidualStream`: the PyTorch reference forward computes tensors
(`surgery.ir.graph.ReferenceSequence`), the exporter writes ONNX nodes and names values
(`surgery.export.decoder`). So the graph verification compares against and the graph the
exporter writes cannot disagree on the topology, and a new sub-block kind or norm placement is
one change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from surgery.architectures.description import Names
from surgery.nodes.attention import Attention
from surgery.nodes.norm import RMSNorm
from surgery.nodes.short_conv import ShortConv

_UNNAMED = Names()  # a backend that names nothing (PyTorch) walks with the default names


@dataclass
class DecoderLayer:
    """One decoder layer; a sub-block set to None was dropped (its residual passes through).

    The first sub-block is the layer's token mixer: its attention, or in a convolution layer
    (LFM2) a short convolution in the same place, with the same norms around it."""

    index: int
    attention: Attention | ShortConv | None
    mlp: torch.nn.Module | None  # a GatedMLP node, or an MoE module (surgery.nodes.moe)
    attention_norm: RMSNorm | None = None  # before the attention (Llama's input_layernorm)
    attention_post_norm: RMSNorm | None = None  # after it, before the residual add (Gemma 3, OLMo 2)
    mlp_norm: RMSNorm | None = None
    mlp_post_norm: RMSNorm | None = None
    residual_scale: float = 1.0  # multiplies each sub-block's update (Granite)

    @property
    def has_attention(self) -> bool:
        """Whether the layer has an attention sub-block (kept, and not a convolution)."""
        return isinstance(self.attention, Attention)

    @property
    def has_conv(self) -> bool:
        """Whether the layer has a short-convolution block in the attention's place."""
        return isinstance(self.attention, ShortConv)

    @property
    def has_mlp(self) -> bool:
        """Whether the MLP sub-block is still there."""
        return self.mlp is not None

    @property
    def sliding_window(self) -> int | None:
        """The attention's sliding window (None: full attention, or no attention)."""
        return self.attention.sliding_window if self.has_attention else None

    def drop_attention(self) -> None:
        """Remove the attention sub-block and its norms: the residual passes through."""
        self.attention = self.attention_norm = self.attention_post_norm = None

    def drop_mlp(self) -> None:
        """Remove the MLP sub-block and its norms: the residual passes through."""
        self.mlp = self.mlp_norm = self.mlp_post_norm = None

    def modules(self) -> list[torch.nn.Module]:
        """The nodes still in this layer."""
        parts = (self.attention_norm, self.attention, self.attention_post_norm,
                 self.mlp_norm, self.mlp, self.mlp_post_norm)  # fmt: skip
        return [m for m in parts if m is not None]


class ResidualStream(Protocol):
    """One backend's residual stream: what each step of a layer's walk does there.

    Values are whatever the backend computes with (tensors, or ONNX value names)."""

    def pre(self, norm: Any, name: str) -> Any:
        """A sub-block's input: the residual (with any pending update added), normalized by
        `norm` (named `name`) when the family has a pre-norm here."""
        ...

    def attention(self, node: Any, x: Any, name: str) -> Any:
        """The token mixer run on `x`: an attention node on the next KV cache slot, or a short
        convolution on the next convolution state."""
        ...

    def mlp(self, node: Any, x: Any, name: str) -> Any:
        """The MLP node (dense or a mixture of experts) run on `x`."""
        ...

    def post(self, norm: Any, update: Any, name: str, scale: float) -> Any:
        """A sub-block's update after its post-norm (when the family has one) and residual scale."""
        ...

    def add(self, update: Any) -> None:
        """Add a sub-block's update to the residual stream."""
        ...

    def after_attention(self, layer: DecoderLayer) -> None:
        """The residual after the attention sub-block (what importance metrics and layer
        fusion read as the layer's "m")."""
        ...

    def after_layer(self, layer: DecoderLayer) -> None:
        """The residual leaving the layer (its "h")."""
        ...


def walk_layer(layer: DecoderLayer, stream: ResidualStream, names: Names = _UNNAMED) -> None:
    """Run `layer` on `stream`: attention (if kept), then the MLP (if kept), each a pre-norm,
    the body, a post-norm and a residual add. A dropped sub-block contributes nothing: the
    residual passes through. Names are the exported ones (`model.layers.3.mlp`)."""
    prefix = f"model.layers.{layer.index}"

    def sub_block(pre_norm, body, module, name: str, pre_name: str, post_norm, post_name: str) -> None:
        x = stream.pre(pre_norm, f"{prefix}.{pre_name}")
        update = body(module, x, f"{prefix}.{name}")
        stream.add(stream.post(post_norm, update, f"{prefix}.{post_name}", layer.residual_scale))

    if layer.attention is not None:
        sub_block(layer.attention_norm, stream.attention, layer.attention, "self_attn", names.attention_pre_norm,
                  layer.attention_post_norm, names.attention_post_norm)  # fmt: skip
    stream.after_attention(layer)
    if layer.mlp is not None:
        sub_block(layer.mlp_norm, stream.mlp, layer.mlp, "mlp", names.mlp_pre_norm, layer.mlp_post_norm,
                  names.mlp_post_norm)  # fmt: skip
    stream.after_layer(layer)
