"""`quantize kv-cache ...`: store the selected layers' KV caches in int8 or int4.

Graph effect: each selected layer's attention gets its cache format and the calibrated scales
of its keys and values (`Attention.kv_quant`; a `pre-rope` cache also its bases); no weight
changes. In PyTorch the layer then reads its keys and values back from the format's grid; in
ONNX its GroupQueryAttention takes an int8 (or packed int4) past and present with `k_scale` /
`v_scale`, or a `pre-rope` layer emits its own attention (surgery/nodes/pre_rope_cache.py). Why: at long context the
cache, not the weights, decides what fits in memory and how fast a token decodes (each decode
step reads all of it); int8 halves an fp16 cache and int4 quarters it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from surgery.formats.kv_cache import KVQuantization
from surgery.ir.graph import DecoderGraph
from surgery.passes.base import GraphPass, PassResult


@dataclass(frozen=True)
class QuantizeKVCache(GraphPass):
    """Give each of `layers` its quantized cache (`quantizations`: layer -> format and scales)."""

    name: ClassVar[str] = "quantize kv-cache"
    preserves_semantics: ClassVar[bool] = False
    layers: tuple[int, ...]
    quantizations: dict[int, KVQuantization] = field(default_factory=dict)

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Each layer has attention whose cache is not quantized yet, and scales of its shape."""
        problems = []
        for index in self.layers:
            layer = graph.layer(index)
            if layer is None or layer.attention is None:
                problems.append(f"layer {index} has no attention, so no KV cache")
                continue
            attention = layer.attention
            if attention.kv_quant is not None:
                problems.append(f"layer {index}: its KV cache is quantized already")
            quant = self.quantizations.get(index)
            if quant is None:
                problems.append(f"layer {index}: no calibrated scales")
                continue
            shape = quant.format.scale_shape(attention.num_kv_heads, attention.head_dim)
            for kind, scale in (("key", quant.k_scale), ("value", quant.v_scale)):
                if tuple(scale.shape) != shape:
                    problems.append(f"layer {index}: {kind} scales of shape {tuple(scale.shape)}, not {shape}")
            for kind, base in (("key", quant.k_base), ("value", quant.v_base)):
                if quant.format.before_rope and (base is None or tuple(base.shape) != shape):
                    problems.append(f"layer {index}: a pre-rope cache needs {kind} bases of shape {shape}")
                elif not quant.format.before_rope and base is not None:
                    problems.append(f"layer {index}: only a pre-rope cache has {kind} bases")
        return problems

    def apply(self, graph: DecoderGraph) -> PassResult:
        """Set each layer's cache format and scales."""
        for index in self.layers:
            graph.layer(index).attention.kv_quant = self.quantizations[index]
        return PassResult(True, self.summary())

    def summary(self) -> str:
        """What the pass does, in one line."""
        kinds = sorted({self.quantizations[index].format.describe() for index in self.layers})
        return f"KV cache of {len(self.layers)} layer(s) stored as {', '.join(kinds)}"

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """Every layer's cache is quantized, with finite positive scales."""
        problems = []
        for index in self.layers:
            quant = graph.layer(index).attention.kv_quant
            if quant is None:
                problems.append(f"layer {index}: its KV cache is not quantized")
                continue
            for kind, scale in (("key", quant.k_scale), ("value", quant.v_scale)):
                if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                    problems.append(f"layer {index}: {kind} scales must be finite and positive")
        return problems

    def parameters(self) -> dict[str, Any]:
        """The layers and each one's format (the scales are the model's: the report leaves them out)."""
        return {"layers": list(self.layers),
                "formats": {index: self.quantizations[index].format.describe() for index in self.layers}}  # fmt: skip
