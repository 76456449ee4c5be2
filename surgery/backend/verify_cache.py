"""Verification of a quantized KV cache: the codes onnxruntime wrote, read back into PyTorch.

A quantized cache rounds activations, not weights: PyTorch and onnxruntime compute a key to
within float rounding (1e-7 relative), and a key whose `x / scale` lies at a rounding tie
(n + 1/2) can round to n on one side and n + 1 on the other. Both are right, but one flipped
code in an outlier channel moves the logits by more than fp32's tolerance (measured on
SmolLM2: 0.39 at 4k tokens). So verification checks the two things separately, as it does
for quantized weights:

- the codes: onnxruntime's cache after the last decode step, against PyTorch's own rounding of
  the keys and values it computes; every code must be PyTorch's, or one step away at a tie
  (within `TIE` of n + 1/2 in units of the scale); any other difference fails verification;
- the arithmetic: PyTorch attends over onnxruntime's codes (dequantized) instead of its own,
  and the logits are compared at the usual tolerance.

A `pre-rope` cache is checked the same way: its codes are unsigned, (x - base) / scale of the
keys before RoPE, written by the export's own operators rather than GroupQueryAttention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from surgery.formats.kv_cache import KVCacheFormat, KVQuantization

TIE = 0.02  # how far from n + 1/2 (in codes) a rounding counts as a tie


def unpack_codes(stored: np.ndarray, fmt: KVCacheFormat) -> torch.Tensor:
    """The codes of a cache tensor as onnxruntime stores it: int8; uint8 two a byte, low nibble
    first, offset by 8 (GroupQueryAttention's int4); or for `pre-rope`, unsigned, int4 packing
    channel i with i + head_dim / 2."""
    codes = torch.from_numpy(np.ascontiguousarray(stored))
    if fmt.bits == 8:
        return codes.to(torch.int16)
    low, high = (codes & 0x0F).to(torch.int16), (codes >> 4).to(torch.int16)
    if fmt.before_rope:
        return torch.cat([low, high], dim=-1)
    return torch.stack([low - 8, high - 8], dim=-1).reshape(*codes.shape[:-1], -1)


@dataclass
class CodeCheck:
    """Codes compared so far: how many, how many differ, and how many of those are not ties."""

    compared: int = 0
    differ: int = 0
    not_at_tie: int = 0
    worst_offset: float = 0.0  # the farthest from a tie any differing code was (in codes)

    def to_json(self) -> dict:
        """Plain data for surgery.json."""
        return {"compared": self.compared, "differ": self.differ, "not_at_a_tie": self.not_at_tie,
                "tie_within": TIE, "worst_offset_from_tie": round(self.worst_offset, 4)}  # fmt: skip


@dataclass
class CacheReadBack:
    """One layer's cache as onnxruntime wrote it (signed codes, (batch, kv_heads, T, head_dim))."""

    keys: torch.Tensor
    values: torch.Tensor
    check: CodeCheck = field(default_factory=CodeCheck)

    def take(self, quant: KVQuantization, k: torch.Tensor, v: torch.Tensor):
        """(keys, values) attention reads: onnxruntime's codes dequantized with `quant`'s scales
        (and bases), after checking them against PyTorch's own rounding of `k` and `v`."""
        fmt = quant.format
        out = []
        for mine, theirs, scale, base in ((k, self.keys, quant.k_scale, quant.k_base),
                                          (v, self.values, quant.v_scale, quant.v_base)):  # fmt: skip
            theirs = theirs[..., : mine.shape[-1]].to(mine.device)
            if theirs.shape != mine.shape:
                raise ValueError(f"onnxruntime's cache holds {tuple(theirs.shape)}, PyTorch computed "
                                 f"{tuple(mine.shape)}")  # fmt: skip
            exact = fmt.exact_codes(mine, scale, base)
            own = exact.round().clamp(*fmt.code_range(base is not None))
            differs = own != theirs
            self.check.compared += own.numel()
            if bool(differs.any()):
                offset = (exact[differs] - exact[differs].floor() - 0.5).abs()
                step = (own[differs] - theirs[differs]).abs()
                self.check.differ += int(differs.sum())
                self.check.not_at_tie += int(((offset > TIE) | (step > 1)).sum())
                self.check.worst_offset = max(self.check.worst_offset, float(offset.max()))
            out.append(fmt.dequantize(theirs, scale, base).to(mine.dtype))
        return out[0], out[1]


def judged(verification, check: CodeCheck):
    """The verification with the codes' check added: failed where a code differs away from a tie."""
    from dataclasses import replace

    verification = replace(verification, kv_cache_codes=check.to_json())
    if check.not_at_tie:
        reason = (f"{check.not_at_tie} of {check.compared} KV cache codes differ from PyTorch's rounding away from "
                  "a rounding tie")  # fmt: skip
        verification = replace(verification, passed=False, reason=f"{verification.reason}; {reason}".strip("; "))
    return verification


def read_back_variant(graph, cache: list[np.ndarray], check: CodeCheck):
    """A verification variant: within a layer's pass, its quantized cache's attention reads
    onnxruntime's codes (`cache`: the final present tensors, key then value per slot)."""
    slots = {layer: slot for slot, layer in enumerate(graph.kv_layers())}

    @contextlib.contextmanager
    def variant(layer) -> Iterator[None]:
        attention = getattr(layer, "attention", None) if layer is not None else None
        quant = getattr(attention, "kv_quant", None)  # a short convolution (LFM2) has no KV cache
        if quant is None or getattr(layer, "index", None) not in slots:
            yield
            return
        slot = slots[layer.index]
        keys, values = (unpack_codes(cache[2 * slot + i], quant.format) for i in (0, 1))
        attention.kv_read_back = CacheReadBack(keys, values, check)
        try:
            yield
        finally:
            attention.kv_read_back = None

    return variant
