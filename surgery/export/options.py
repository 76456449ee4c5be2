"""Export options (what `export onnx ...` asks for); importable without torch or onnx."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OPSET = 21
SUPPORTED_OPSETS = range(17, 24)


@dataclass(frozen=True)
class ExportOptions:
    """What `export onnx ...` asked for."""

    opset: int = DEFAULT_OPSET
    kv_cache: bool = True
    # Write a tied head as its own initializer (transposed embedding), so that an ONNX pass can
    # replace its MatMul (quantizing the head must not touch the embedding the Gather reads).
    untie_head: bool = False
    # Rotary positions from an explicit `position_ids` input (RotaryEmbedding nodes before
    # attention) instead of the padded index inside GroupQueryAttention (see export/decoder.py).
    position_ids: bool = False
    # Mixture-of-experts layers: "plain" ONNX ops (every expert on every token, any routing), or
    # onnxruntime's "contrib" com.microsoft.MoE where the routing is its softmax top-k (only the
    # chosen experts run); layers it cannot express stay plain. See docs/moe.md for the timings.
    moe_operator: str = "contrib"
    # The element type of weights, activations, KV cache and logits; every node component reads
    # it. Only fp32 is exposed for now.
    precision: str = "fp32"
