"""GPTQ: rounding a weight onto MatMulNBits' grid so that the layer's outputs, not its weights,
stay closest to the original's on calibration data.

Round-to-nearest (what onnxruntime's quantizer and the builder do) rounds every weight on its
own. GPTQ (Frantar et al., 2022) rounds the input columns of a weight one at a time and moves
each column's rounding error onto the columns not yet rounded, weighted by the inverse of the
Hessian `H = X^T X` of the layer's inputs X on calibration data: the error a column leaves is
cancelled, as far as the inputs allow, by the others. The grid is onnxruntime's own: a block's
scale and zero point come from its kernel (`surgery.analysis.quantization.quantize_blocks`) applied to
the block's columns as updated so far, so the result is an ordinary MatMulNBits weight (same
layout, same size) and, with a diagonal Hessian (no column informs another), it equals
round-to-nearest exactly.

`gptq_blocks` quantizes one weight; `surgery.analysis.calibrated_quantization` collects the Hessians
layer by layer and feeds each layer the outputs of the layers already quantized, as GPTQ does.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.analysis.quantization import BlockQuantized, quantize_blocks

DAMPING = 0.01  # fraction of the Hessian's mean diagonal added to it (GPTQ's `percdamp`)
_LAZY_COLUMNS = 128  # columns rounded before their error is pushed to the rest in one matmul


def _block_grid(columns: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per output row for one block of input columns (N, block), exactly as
    onnxruntime's quantizer chooses them (its kernel, run on these columns)."""
    blocks = quantize_blocks(columns.T.contiguous().numpy(), bits, columns.shape[1], symmetric)
    scale = torch.from_numpy(blocks.scales[:, 0].astype(np.float32))
    if symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        packed = torch.from_numpy(blocks.zero_points[:, 0].astype(np.int32))
        zero = (packed & 0x0F if bits == 4 else packed).float()
    return scale, zero


def _pack(values: torch.Tensor, bits: int) -> np.ndarray:
    """(rows, count) integer codes -> uint8, first element in the low bits (two per byte at 4 bits)."""
    codes = values.to(torch.uint8)
    if bits == 8:
        return codes.numpy()
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).numpy()


def _inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 (dampened), which GPTQ's updates read row by row."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: nothing to protect
    h[dead, dead] = 1
    h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(4):  # a nearly singular H: dampen more until it factors
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(inverse, upper=True).float()
        except torch.linalg.LinAlgError:
            h += (10**attempt) * damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    raise ValueError("the calibration Hessian is not positive definite even after damping")


@torch.no_grad()
def gptq_blocks(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, block: int, symmetric: bool, damping: float = DAMPING
) -> BlockQuantized:
    """`weight` (N, K), PyTorch's (out, in) layout, rounded by GPTQ against `hessian` (K, K,
    the inputs' X^T X) onto MatMulNBits blocks of `block` input columns; what
    `quantize_blocks_nk` returns for round-to-nearest, in the same layout.

    Blocks are chosen in order: a block's scale and zero point are taken from its columns once
    the errors of the blocks before it have been pushed onto them. K that is not a multiple of
    `block` is padded with zero columns (as onnxruntime pads), which cost nothing.
    """
    n, k = weight.shape
    padded = -(-k // block) * block
    w = torch.zeros(n, padded, dtype=torch.float32)
    w[:, :k] = weight.detach().float()
    h = torch.zeros(padded, padded, dtype=torch.float64)
    h[:k, :k] = hessian.double()
    dead = torch.diagonal(h) == 0
    w[:, dead] = 0
    factor = _inverse_hessian_factor(h, damping)
    top = (1 << bits) - 1
    codes = torch.zeros(n, padded, dtype=torch.int16)
    scales = torch.zeros(n, padded // block, dtype=torch.float32)
    zeros = torch.zeros(n, padded // block, dtype=torch.float32)
    lazy = max(block, _LAZY_COLUMNS // block * block)  # whole blocks per lazy batch
    scale = zero = torch.empty(0)
    for first in range(0, padded, lazy):
        last = min(first + lazy, padded)
        part = w[:, first:last].clone()
        errors = torch.zeros_like(part)
        inverse = factor[first:last, first:last]
        for i in range(last - first):
            column = first + i
            if column % block == 0:
                scale, zero = _block_grid(part[:, i : i + block], bits, symmetric)
                scales[:, column // block], zeros[:, column // block] = scale, zero
            value = part[:, i]
            code = torch.clamp(torch.round(value / torch.where(scale == 0, 1, scale)) + zero, 0, top)
            rounded = (code - zero) * scale
            codes[:, column] = code.to(torch.int16)
            error = (value - rounded) / inverse[i, i]
            part[:, i:] -= error[:, None] * inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, last:] -= errors @ factor[first:last, last:]
    codes[:, k:] = 0  # the padding's codes, as onnxruntime leaves them (never read: K is k)
    packed = _pack(codes.reshape(n, padded // block, block), bits)
    zero_points = None
    if not symmetric:
        zero_points = _pack(zeros.to(torch.int16), bits)
    return BlockQuantized(packed, scales.numpy(), zero_points)
