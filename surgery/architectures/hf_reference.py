"""The Hugging Face model itself, driven like a `DecoderGraph`, for parity against it.

Tests and `benchmarks/parity_families.py` compare exported ONNX models with the Hugging Face
model (not our reference): `HuggingFaceForward` gives it the `forward`/`new_cache` interface
`surgery.backend.verify.trace_reference` drives, with transformers' own KV cache; `edit_like_graph`
makes it compute what a drop pass leaves (a dropped sub-block contributes zero, a dropped
layer passes its input through).
"""

from __future__ import annotations

from typing import Any

import torch

from surgery import architectures


class HuggingFaceForward:
    """The Hugging Face model behind the interface `trace_reference` drives (its own KV cache)."""

    fusion = None
    last_choice = None

    def __init__(self, model: Any):
        self.model = model

    def new_cache(self):
        """transformers' dynamic cache for this model."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, cache=None, **_):
        """Logits of the Hugging Face forward (with its cache when one is given)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.logits


def _zero_attention(hidden_states, *args, **kwargs):
    return torch.zeros_like(hidden_states), None


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def edit_like_graph(model: Any, part: str, layers: tuple[int, ...]) -> None:
    """Make the Hugging Face model compute what dropping `part` (attention, mlp, block) of
    `layers` leaves. Run it without its cache afterwards: transformers' cache bookkeeping
    assumes every layer attends."""
    arch = architectures.lookup(model.config.model_type)
    hf_layers = getattr(getattr(model, arch.names.body), arch.names.layers)
    for i in layers:
        layer = hf_layers[i]
        if part == "attention":
            getattr(layer, arch.names.attention).forward = _zero_attention
        elif part == "mlp":
            getattr(layer, arch.names.mlp).forward = torch.zeros_like
        elif part == "block":
            layer.forward = _pass_through
