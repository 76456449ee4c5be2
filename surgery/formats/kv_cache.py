"""The KV cache's storage format: a record that owns every fact about a quantized cache.

onnxruntime 1.32's GroupQueryAttention stores the cache quantized when its `past_key` and
`past_value` are int8 (8 bits) or uint8 holding two 4-bit values (4 bits, low nibble first),
with float `k_scale` / `v_scale` inputs: one scale per tensor or one per channel (key/value
head and head dimension, shape (1, kv_heads, 1, head_dim)). The CPU and CUDA kernels both run
int8 and int4 caches; fp8 (float8e4m3fn) has a CUDA kernel only (measured: onnxruntime 1.32's
CPU provider has no GroupQueryAttention for a float8 cache).

Quantization is symmetric: q = clamp(round_half_even(x / scale), -2^(b-1), 2^(b-1) - 1), stored
as is for int8 and offset by 8 for int4; attention reads q * scale, for the new tokens of a
prompt too (measured on the CPU kernel: its output equals attention over the dequantized keys
and values to 1e-7). The PyTorch side (`fake_quantize`) rounds the same way, so verification
compares like with like.

`pre-rope` is a layout of our own, emitted as plain ONNX operators around the attention
(surgery/nodes/pre_rope_cache.py) instead of GroupQueryAttention's: keys are stored *before*
RoPE, each channel with a float offset (`base`) and scale: q = clamp(round_half_even((x - base)
/ scale), 0, 2^b - 1), read back as q * scale + base, then rotated at their positions. Before
RoPE a channel's keys keep their place (no rotation spreads them over the pair's circle) and a
constant offset, such as Qwen2's large key biases, costs no range (KVQuant's observation).
Values are stored the same way with base = -2^(b-1) * scale, which is the symmetric grid. Codes
are unsigned; int4 packs channel i with channel i + head_dim / 2 (low nibble first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the record itself imports neither torch nor onnx (check and plan use it)
    import torch

_ONNX_INT8, _ONNX_UINT8 = 3, 2  # onnx.TensorProto.INT8, UINT8
_TINY = 1.1754943508222875e-38  # float32's smallest normal: a channel that was always 0

WIDTHS = {"int8": 8, "int4": 4}  # the widths written, as recipes name them
DEFAULT_GRANULARITY = "per-channel"
PRE_ROPE = "pre-rope"
GRANULARITIES = ("per-channel", "per-tensor", PRE_ROPE)


@dataclass(frozen=True)
class KVCacheFormat:
    """How one layer's keys and values are stored: `bits` (8 or 4), one scale per channel or one
    per tensor, and where the keys are taken: after RoPE (onnxruntime's GroupQueryAttention
    stores them) or before it with a per-channel offset (`before_rope`, our own layout)."""

    bits: int
    per_channel: bool = True
    before_rope: bool = False

    @classmethod
    def of(cls, bits: int, granularity: str) -> KVCacheFormat:
        """The format a recipe names: `bits` and one of `GRANULARITIES`."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown KV cache granularity {granularity!r} (one of {', '.join(GRANULARITIES)})")
        return cls(bits, granularity != "per-tensor", granularity == PRE_ROPE)

    @property
    def native(self) -> bool:
        """Whether onnxruntime's GroupQueryAttention stores the cache itself (and so onnxruntime-genai
        can run it); `pre-rope` caches are read and written by operators of our own."""
        return not self.before_rope

    @property
    def name(self) -> str:
        """`int8` or `int4`, as recipes write it."""
        return f"int{self.bits}"

    @property
    def granularity(self) -> str:
        """`per-channel`, `per-tensor` or `pre-rope`, as recipes write it."""
        if self.before_rope:
            return PRE_ROPE
        return "per-channel" if self.per_channel else "per-tensor"

    def describe(self) -> str:
        """`int8 per-channel`."""
        return f"{self.name} {self.granularity}"

    @property
    def onnx_type(self) -> int:
        """The past/present tensors' element type."""
        return _ONNX_INT8 if self.bits == 8 and not self.before_rope else _ONNX_UINT8

    @property
    def quant_type(self) -> str:
        """GroupQueryAttention's `k_quant_type` / `v_quant_type`."""
        return "PER_CHANNEL" if self.per_channel else "PER_TENSOR"

    @property
    def lowest(self) -> int:
        """The smallest code of the symmetric grid."""
        return -(1 << (self.bits - 1))

    @property
    def highest(self) -> int:
        """The largest code of the symmetric grid (a threshold maps to it)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def levels(self) -> int:
        """The largest unsigned code of a `pre-rope` cache (2^bits - 1)."""
        return (1 << self.bits) - 1

    def code_range(self, based: bool) -> tuple[int, int]:
        """(lowest, highest) code: unsigned where the grid has a base, else symmetric."""
        return (0, self.levels) if based else (self.lowest, self.highest)

    def stored_head_dim(self, head_dim: int) -> int:
        """The last dimension of the past/present tensors: int4 packs two values a byte."""
        return head_dim if self.bits == 8 else (head_dim + 1) // 2

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        """Bytes one token adds to one layer's cache (keys and values)."""
        return 2 * kv_heads * self.stored_head_dim(head_dim)

    def scale_shape(self, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """The shape of `k_scale` / `v_scale` (broadcast against the cache's BNSH layout)."""
        return (1, kv_heads, 1, head_dim) if self.per_channel else (1,)

    def scale_of(self, threshold: torch.Tensor) -> torch.Tensor:
        """The scale that maps `threshold` (a magnitude, per channel or one) to the largest code."""
        return (threshold.float() / self.highest).clamp_min(_TINY)

    def scale_of_range(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """The scale that spreads [low, high] over the unsigned grid (a `pre-rope` key channel)."""
        return ((high.float() - low.float()) / self.levels).clamp_min(_TINY)

    def exact_codes(self, x: torch.Tensor, scale: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """(x - base) / scale in float32, before rounding: what the stored code rounds."""
        x = x.float()
        return (x if base is None else x - base.to(x.device)) / scale.to(x.device)

    def codes(self, x: torch.Tensor, scale: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The stored codes of `x` (as float32): rounded half to even and clamped to the grid."""
        return self.exact_codes(x, scale, base).round_().clamp_(*self.code_range(base is not None))

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """What attention reads for `codes` (float32)."""
        out = codes.float() * scale.to(codes.device)
        return out if base is None else out + base.to(codes.device)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """`x` (batch, kv_heads, seq, head_dim) as attention reads it back from the cache."""
        return self.dequantize(self.codes(x, scale, base), scale, base).to(x.dtype)

    def to_json(self) -> dict:
        """Plain data for the plan and the report."""
        return {"bits": self.bits, "granularity": self.granularity}

    @classmethod
    def from_json(cls, data: dict) -> KVCacheFormat:
        """The record `to_json` wrote."""
        return cls.of(int(data["bits"]), data.get("granularity", DEFAULT_GRANULARITY))


def element_bytes_per_token(kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one token adds to one layer's unquantized cache (keys and values)."""
    return 2 * kv_heads * head_dim * itemsize


def cache_bytes_per_token(layers: dict, itemsize: int) -> int:
    """Bytes one token adds to the whole cache: `layers` maps each layer with a cache to
    (kv_heads, head_dim, its format's JSON or None for the element type of `itemsize` bytes)."""
    total = 0
    for kv_heads, head_dim, stored in layers.values():
        if stored is None:
            total += element_bytes_per_token(kv_heads, head_dim, itemsize)
        else:
            total += KVCacheFormat.from_json(stored).bytes_per_token(kv_heads, head_dim)
    return total


MEMORY_SIZES_GB = (1, 4, 16)  # the report's "longest context in N GB of cache"


def cache_budget(layers: dict, itemsize: int, context_length: int) -> dict:
    """The report's KV figures: bytes per token, and the longest context whose cache fits in
    each of `MEMORY_SIZES_GB` (at most the model's context length; batch 1)."""
    per_token = cache_bytes_per_token(layers, itemsize)
    fits = {f"{gb} GB": (min(context_length, gb * 10**9 // per_token) if per_token else context_length)
            for gb in MEMORY_SIZES_GB}  # fmt: skip
    return {"bytes_per_token": per_token, "bytes_at_context": per_token * context_length,
            "longest_context_in": fits}  # fmt: skip


@dataclass(frozen=True)
class KVQuantization:
    """One attention layer's quantized cache: its format and calibrated scales (float32, in
    `format.scale_shape`), and for a `pre-rope` cache the bases (offsets) of the same shape."""

    format: KVCacheFormat
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_base: torch.Tensor | None = None
    v_base: torch.Tensor | None = None

    def read_back(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) as attention reads them back from the cache (PyTorch's own rounding)."""
        fmt = self.format
        return fmt.fake_quantize(k, self.k_scale, self.k_base), fmt.fake_quantize(v, self.v_scale, self.v_base)
