"""The decoder graph that passes rewrite, and its PyTorch reference forward.

A Llama-family causal LM is a chain: embedding -> layers -> final norm -> head, each layer being
`m = x + Attn(Norm1(x))`, `h = m + MLP(Norm2(m))`. `DecoderGraph` holds that chain with the
Hugging Face modules as its nodes; a pass removes nodes (an attention sub-block with its norm,
an MLP with its norm, or a whole layer). Layers keep their *original* numbers throughout.

`DecoderGraph.forward` runs the edited chain with the Hugging Face modules themselves (eager
attention, their RoPE, their norms), which makes it the reference the exported ONNX model is
verified against. Its mask and KV cache are our own so that layers without attention simply
have no cache slot: cache slot k belongs to the k-th kept attention layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from surgery.fusion import FusionChoice, HeadFusion, fused_logits
from surgery.models.index import ModelIndex

# observer(layer number, x entering the layer, m after attention, h leaving the layer)
ResidualObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class DecoderLayer:
    """One decoder layer; a sub-block set to None was dropped (its residual passes through)."""

    index: int
    input_norm: torch.nn.Module | None
    attention: torch.nn.Module | None
    post_norm: torch.nn.Module | None
    mlp: torch.nn.Module | None
    sliding_window: int | None = None

    @property
    def has_attention(self) -> bool:
        """Whether the attention sub-block is still there."""
        return self.attention is not None

    @property
    def has_mlp(self) -> bool:
        """Whether the MLP sub-block is still there."""
        return self.mlp is not None


@dataclass
class KVCache:
    """Keys and values per kept attention layer, (batch, kv_heads, length, head_dim) each."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    def length(self) -> int:
        """Number of cached positions (0 before the first step)."""
        for key in self.keys:
            if key is not None:
                return int(key.shape[2])
        return 0


class _SlotCache:
    """What a Hugging Face attention module calls `past_key_values`: appends to one slot."""

    def __init__(self, cache: KVCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        cache, slot = self.cache, self.slot
        past_key, past_value = cache.keys[slot], cache.values[slot]
        if past_key is not None:
            key = torch.cat([past_key, key], dim=2)
            value = torch.cat([past_value, value], dim=2)
        cache.keys[slot], cache.values[slot] = key, value
        return key, value


class DecoderGraph:
    """A Llama-family causal LM as an editable chain of layers over the Hugging Face modules."""

    def __init__(self, model: Any, index: ModelIndex):
        self.model = model
        self.index = index
        self.config = model.config
        core = model.model
        self.embed = core.embed_tokens
        self.final_norm = core.norm
        self.rotary = core.rotary_emb
        self.lm_head = model.lm_head
        self.fusion: HeadFusion | None = None  # set by the `fuse` pass
        self.last_choice: FusionChoice | None = None  # dynamic fusion's choice in the last forward
        self.tied_head = self.lm_head.weight.data_ptr() == self.embed.weight.data_ptr()
        self.layers: list[DecoderLayer] = []
        for i, layer in enumerate(core.layers):
            window = index.sliding_window if index.layer_sliding[i] else None
            self.layers.append(
                DecoderLayer(
                    index=i,
                    input_norm=layer.input_layernorm,
                    attention=layer.self_attn,
                    post_norm=layer.post_attention_layernorm,
                    mlp=layer.mlp,
                    sliding_window=window,
                )
            )

    # Structure queries used by passes, the exporter and the report.

    def layer(self, index: int) -> DecoderLayer | None:
        """The layer with original number `index`, or None if its block was dropped."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        return None

    def kv_layers(self) -> list[int]:
        """Original numbers of the layers that keep attention, in order: KV slot k -> layer."""
        return [layer.index for layer in self.layers if layer.has_attention]

    def parameter_count(self) -> int:
        """Parameters still reachable from the graph (a tied head counts once)."""
        modules: list[torch.nn.Module] = [self.embed, self.final_norm]
        if not self.tied_head:
            modules.append(self.lm_head)
        for layer in self.layers:
            modules += [m for m in (layer.input_norm, layer.attention, layer.post_norm, layer.mlp) if m is not None]
        return sum(p.numel() for m in modules for p in m.parameters())

    # The reference forward.

    def new_cache(self) -> KVCache:
        """An empty KV cache with one slot per kept attention layer."""
        slots = len(self.kv_layers())
        return KVCache(keys=[None] * slots, values=[None] * slots)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        observer: ResidualObserver | None = None,
        logits: bool = True,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab). `attention_mask` covers past + new tokens (1 = real token).

        `observer(layer, x, m, h)` sees each layer's residual stream: entering the layer (x),
        after attention (m) and leaving it (h), which is what importance metrics read. With
        `logits=False` the final norm and head are skipped and the last residual is returned.
        """
        past = cache.length() if cache is not None else 0
        fused = set(self.fusion.layers) if self.fusion is not None and logits else set()
        residuals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hidden = self.embed(input_ids)
        position_embeddings = self.rotary(hidden, position_ids)
        masks: dict[int | None, torch.Tensor] = {}
        slot = 0
        for layer in self.layers:
            entering = hidden
            if layer.attention is not None:
                if layer.sliding_window not in masks:
                    masks[layer.sliding_window] = attention_bias(
                        attention_mask, input_ids.shape[1], past, layer.sliding_window, hidden.dtype
                    )
                attn_out, _ = layer.attention(
                    hidden_states=layer.input_norm(hidden),
                    position_embeddings=position_embeddings,
                    attention_mask=masks[layer.sliding_window],
                    past_key_values=_SlotCache(cache, slot) if cache is not None else None,
                )
                hidden = hidden + attn_out
                slot += 1
            after_attention = hidden
            if layer.mlp is not None:
                hidden = hidden + layer.mlp(layer.post_norm(hidden))
            if observer is not None:
                observer(layer.index, entering, after_attention, hidden)
            if layer.index in fused:
                residuals[layer.index] = (after_attention, hidden)
        if not logits:
            return hidden
        if self.fusion is not None:
            fused, self.last_choice = fused_logits(self, self.fusion, hidden, residuals)
            return fused
        return self.lm_head(self.final_norm(hidden))


def attention_bias(
    attention_mask: torch.Tensor, query_len: int, past_len: int, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive (batch, 1, query, key) mask: causal, padding, and an optional sliding window.

    Positions are indices into the padded sequence, as in transformers: query i sits at
    `past_len + i`; it sees key j when j <= that index, the key is not padding, and (with a
    window) the distance is below the window.
    """
    total = attention_mask.shape[1]
    query_pos = torch.arange(past_len, past_len + query_len)[:, None]
    key_pos = torch.arange(total)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= (query_pos - key_pos) < window
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (left padding gets position 1, as transformers does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)
