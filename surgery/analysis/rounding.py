"""Choosing a MatMulNBits block's grid (scale and zero point) in torch, on any device.

onnxruntime's quantizer takes a block's grid from its range: asymmetric, the scale spans
[min(v, 0), max(v, 0)] over 2^bits - 1 steps and the zero point is the rounded position of 0;
symmetric, the value of largest magnitude maps to the lowest code. `range_grid` is that rule,
written in torch so that GPTQ can take each block's grid on the device it runs on (it equals
onnxruntime's kernel's scales and zero points: tests/test_rounding.py).

A range grid wastes resolution on one outlier and ignores which inputs matter. `searched_grid`
tries narrower scales (and, asymmetric, the zero points around each) and keeps, per block, the
one with the least squared error weighted by how large each input column is on calibration
data: llama.cpp's importance matrix (`imatrix`), whose weights are the mean squared
activation of each input column, the diagonal of GPTQ's Hessian `X^T X`. With no calibration
data the weights are uniform. Whatever is chosen is an ordinary MatMulNBits block: the format,
layout and size do not change, only which grid the codes sit on.

With `half` (a format whose scales are stored in fp16) every grid's scale is rounded to fp16
before its zero point and codes are taken, so the codes sit on the scale that is stored.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.analysis.quantization import BlockQuantized

# Scale factors tried by the search, relative to the range grid's scale, as llama.cpp's
# make_qkx/make_qx search around theirs. On SmolLM2's linears (int4, block 32, heavy-tailed
# weights) the weighted error against rounding to nearest: 8 steps over 0.7..1.05 -36%,
# 15 steps -38%, these 25 over 0.6..1.2 -43%; the time grows with the count.
SEARCH_FACTORS = tuple(round(0.6 + 0.025 * i, 3) for i in range(25))  # 0.6 .. 1.2
# A quick search for measuring what a format costs (the sensitivity of a 150k-row head in six
# formats), not for writing: most of the gain at a fifth of the evaluations.
COARSE_FACTORS = (0.7, 0.8, 0.9, 1.0, 1.1)
# Weights an elementwise pass takes at once on the CPU (2 MB of float32): the search's and the
# error measures' passes read a chunk from the caches, and their temporaries are small ones the
# allocator reuses.
CHUNK_VALUES = 1 << 19


def _middle(bits: int) -> int:
    return 1 << (bits - 1)


def _halved(scale: torch.Tensor, half: bool) -> torch.Tensor:
    """`scale` rounded to the nearest fp16 value (kept float32) when stored in fp16."""
    return scale.half().float() if half else scale


def _zero_point(low: torch.Tensor, scale: torch.Tensor, top: int) -> torch.Tensor:
    """The rounded code of 0 on a grid from `low` (<= 0) in steps of `scale`."""
    position = torch.where(scale != 0, -low / torch.where(scale != 0, scale, 1), 0)
    return torch.floor(position + 0.5).clamp(0, top)  # roundf of a non-negative value


def range_grid(
    blocks: torch.Tensor, bits: int, symmetric: bool, half: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """onnxruntime's grid of each block of `blocks` (..., block): (scale, zero point), both
    float (...), the zero point a whole number (2^(bits-1) when symmetric); `half`: the scale
    rounded to fp16 first."""
    top = (1 << bits) - 1
    low = blocks.amin(-1)
    high = blocks.amax(-1)
    if symmetric:
        extreme = torch.where(high.abs() > low.abs(), high, low)
        scale = _halved(extreme / -_middle(bits), half)  # negative when the extreme is positive, as onnxruntime's
        return scale, torch.full_like(scale, float(_middle(bits)))
    low = low.clamp(max=0)
    high = high.clamp(min=0)
    scale = _halved((high - low) / top, half)
    return scale, _zero_point(low, scale, top)


def encode(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes (as floats) of `blocks` (..., block) on the grid (scale, zero) (...)."""
    inverse = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1), 0)
    # in place on one temporary: the search encodes every weight 27 times
    return (blocks * inverse[..., None]).add_(zero[..., None]).add_(0.5).floor_().clamp_(0, (1 << bits) - 1)


def rounded(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The values `blocks` (..., block) stand for once rounded onto the grid (scale, zero) (...)."""
    return (encode(blocks, scale, zero, bits) - zero[..., None]) * scale[..., None]


def squared_error(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """(blocks - rounded(blocks, scale, zero))^2, elementwise, in place on `encode`'s temporary."""
    codes = encode(blocks, scale, zero, bits)
    return codes.sub_(zero[..., None]).mul_(scale[..., None]).sub_(blocks).square_()


def _weighted_error(blocks, weights, scale, zero, bits) -> torch.Tensor:
    return squared_error(blocks, scale, zero, bits).mul_(weights).sum(-1)


def searched_grid(
    blocks: torch.Tensor, weights: torch.Tensor, bits: int, symmetric: bool, factors: tuple = SEARCH_FACTORS,
    half: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each block (..., block) with the least `weights`-weighted squared error among
    the range grid scaled by `factors` (asymmetric: each with its rounded zero point, then
    the best one's zero point moved by one either way). `weights` broadcasts against `blocks`;
    never worse than `range_grid`, which is among the candidates; `half`: every scale tried
    is rounded to fp16."""
    base_scale, base_zero = range_grid(blocks, bits, symmetric, half)
    best_scale, best_zero = base_scale, base_zero
    best = _weighted_error(blocks, weights, base_scale, base_zero, bits)
    top = (1 << bits) - 1
    low = blocks.amin(-1).clamp(max=0)

    def consider(scale: torch.Tensor, zero: torch.Tensor) -> None:
        nonlocal best, best_scale, best_zero
        error = _weighted_error(blocks, weights, scale, zero, bits)
        better = error < best
        best = torch.where(better, error, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)

    for factor in factors:
        if factor == 1.0:
            continue
        scale = _halved(base_scale * float(factor), half)
        if symmetric:
            consider(scale, base_zero)
        else:
            consider(scale, _zero_point(low, scale, top))
    if not symmetric:
        scale, zero = best_scale, best_zero
        for shift in (-1, 1):
            consider(scale, (zero + shift).clamp(0, top))
    return best_scale, best_zero


def pack_codes(codes: torch.Tensor, bits: int, pad: int = 0) -> np.ndarray:
    """(..., count) integer codes -> uint8 bytes, first element in the low bits (two per byte at
    4 bits; an odd count's last byte has `pad` in its high bits)."""
    codes = codes.to(torch.uint8)  # packed where they are: half the bytes cross from a GPU
    if bits == 8:
        return codes.cpu().numpy()
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=pad)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).cpu().numpy()


def to_blocks(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool, half: bool = False
) -> BlockQuantized:
    """Codes (N, blocks, block) with their grid (N, blocks) in MatMulNBits' layout; `half`:
    the scales (already on fp16 values) stored as fp16."""
    # onnxruntime fills an odd count's last zero-point nibble with the symmetric zero point
    zero_points = None if symmetric else pack_codes(zero, bits, pad=_middle(bits))
    scales = scale.half() if half else scale.float()
    return BlockQuantized(pack_codes(codes, bits), scales.cpu().numpy(), zero_points)


def padded_blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(N, K) -> (N, K/block, block) float32, K padded with zeros to whole blocks (as onnxruntime pads)."""
    n, k = weight.shape
    padded = -(-k // block) * block
    w = weight.float()
    if padded != k:
        w = torch.nn.functional.pad(w, (0, padded - k))
    return w.reshape(n, padded // block, block)


def _searched_chunks(weight, importance, bits: int, block: int, symmetric: bool, factors: tuple,
                     half: bool = False):  # fmt: skip
    """(blocks, scale, zero) of each chunk of rows of an (N, K) weight, its grids searched (no
    `factors`: onnxruntime's range grid)."""
    n, k = weight.shape
    padded = -(-k // block) * block
    weights = torch.ones(padded, device=weight.device)
    if importance is not None:
        weights[:k] = importance.to(weight.device).float()
        weights[k:] = 0
    weights = weights.reshape(padded // block, block)
    rows = max(1, CHUNK_VALUES // padded)
    for start in range(0, n, rows):
        part = padded_blocks(weight[start : start + rows].detach(), block)
        if factors:
            yield (part, *searched_grid(part, weights, bits, symmetric, factors, half))
        else:
            yield (part, *range_grid(part, bits, symmetric, half))


@torch.no_grad()
def rounded_searched(weight: torch.Tensor, importance: torch.Tensor | None, bits: int, block: int,
                     symmetric: bool, factors: tuple = COARSE_FACTORS, half: bool = False) -> torch.Tensor:  # fmt: skip
    """The (N, K) float weight `quantize_searched` would stand for, with a quicker search by
    default: what measuring a format's cost needs (no packing)."""
    n, k = weight.shape
    result = torch.empty(n, k, dtype=torch.float32, device=weight.device)
    start = 0
    for part, scale, zero in _searched_chunks(weight, importance, bits, block, symmetric, factors, half):
        result[start : start + len(part)] = rounded(part, scale, zero, bits).reshape(len(part), -1)[:, :k]
        start += len(part)
    return result


@torch.no_grad()
def quantize_searched(
    weight: torch.Tensor, importance: torch.Tensor | None, bits: int, block: int, symmetric: bool,
    half: bool = False, factors: tuple = SEARCH_FACTORS,
) -> BlockQuantized:
    """An (N, K) weight rounded to nearest on the grid `searched_grid` picks per block, its error
    weighted per input column by `importance` (K,) (uniform when None); no `factors`: on
    onnxruntime's range grid. Rows are taken a chunk at a time, on the weight's device, and
    each chunk is packed before the next (a 150k-row head never holds its codes as floats)."""
    n, k = weight.shape
    parts = []
    for part, scale, zero in _searched_chunks(weight, importance, bits, block, symmetric, factors, half):
        codes = encode(part, scale, zero, bits)
        if codes.shape[1] * block != k:
            codes.view(len(codes), -1)[:, k:] = 0  # the padding's codes, as onnxruntime leaves them
        parts.append(to_blocks(codes, scale, zero, bits, symmetric, half))
        del codes, part
    if len(parts) == 1:
        return parts[0]
    return BlockQuantized(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        None if symmetric else np.concatenate([p.zero_points for p in parts]),
    )


def quantize_range(weight: torch.Tensor, bits: int, block: int, symmetric: bool, half: bool = False) -> BlockQuantized:
    """An (N, K) weight rounded to nearest on onnxruntime's range grid, in torch (its packer's
    bytes: tests/test_rounding.py), scales rounded to fp16 first with `half`."""
    return quantize_searched(weight, None, bits, block, symmetric, half, factors=())
