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

Two refinements, each an option: the grid of a block can be `searched` (the grid with the
least error weighted by the Hessian's diagonal, `surgery.analysis.rounding.searched_grid`,
instead of the range's), and `act_order` rounds the columns in order of decreasing input
energy (the Hessian's diagonal), so that the columns that matter most are rounded first and
their error is spread over the rest; with act-order every block's grid is chosen from the
original weights before any column moves ("static groups"), so the blocks stay contiguous and
MatMulNBits needs no `g_idx`. Everything runs in torch on the weight's device (`--device cuda`).

`gptq_blocks` quantizes one weight; `surgery.analysis.calibrated_quantization` collects the Hessians
layer by layer and feeds each layer the outputs of the layers already quantized, as GPTQ does.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.analysis.quantization import BlockQuantized
from surgery.analysis.rounding import range_grid, searched_grid, to_blocks

DAMPING = 0.01  # fraction of the Hessian's mean diagonal added to it (GPTQ's `percdamp`)
# Columns rounded before their error is pushed to the rest in one matmul. GPTQ's reference
# takes 128; each column's update touches the rest of its batch, so on the CPU 32 is faster
# (a 151,936-row head: 20 s against 52 s on two cores), and on the GPU the launches per column
# are the cost either way.
_LAZY_COLUMNS = 32


def _inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (dampened; H^-1 = U^T U), which GPTQ's updates read
    row by row.

    Computed in float32 (as GPTQ's reference does) from one Cholesky factorization and one
    triangular inverse: with P the order-reversing permutation and P H P = L L^T,
    H^-1 = (P L^-1 P)^T (P L^-1 P) and P L^-1 P is upper triangular. Forming H^-1 and factoring
    it again costs twice as much, in float64 four times (15 s against 6.5 s for an 8960-column
    down projection on two cores)."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: nothing to protect
    h[dead, dead] = 1
    mean = torch.diagonal(h).mean()
    h.diagonal().add_(damping * mean)
    flipped = h.flip(0, 1)
    for attempt in range(4):  # a nearly singular H: dampen more until it factors
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
        flipped.diagonal().add_((10**attempt) * damping * mean)
    raise ValueError("the calibration Hessian is not positive definite even after damping")


def _grid(columns: torch.Tensor, importance: torch.Tensor, bits: int, symmetric: bool, searched: bool):
    """(scale, zero) per row for the block `columns` (N, block)."""
    if searched:
        return searched_grid(columns, importance, bits, symmetric)
    return range_grid(columns, bits, symmetric)


@torch.no_grad()
def gptq_blocks(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    block: int,
    symmetric: bool,
    damping: float = DAMPING,
    searched: bool = False,
    act_order: bool = False,
) -> BlockQuantized:
    """`weight` (N, K), PyTorch's (out, in) layout, rounded by GPTQ against `hessian` (K, K,
    the inputs' X^T X) onto MatMulNBits blocks of `block` input columns; what
    `quantize_blocks_nk` returns for round-to-nearest, in the same layout. Runs on the
    Hessian's device.

    Without act-order, blocks are chosen in order: a block's scale and zero point are taken
    from its columns once the errors of the blocks before it have been pushed onto them. K that
    is not a multiple of `block` is padded with zero columns (as onnxruntime pads), which cost
    nothing. Rows never exchange errors, so they are rounded a chunk at a time: a 150k-row head
    holds one chunk of float temporaries, not three copies of itself.
    """
    device = hessian.device
    n, k = weight.shape
    padded = -(-k // block) * block
    h = torch.zeros(padded, padded, dtype=torch.float32, device=device)
    h[:k, :k] = hessian.float()
    energy = torch.diagonal(h).clone()
    order = torch.argsort(energy, descending=True, stable=True) if act_order else None
    if order is not None:
        h = h[order][:, order]
    factor = _inverse_hessian_factor(h, damping)
    del h
    rows = max(1, _chunk_values(device) // padded)
    parts = []
    for start in range(0, n, rows):
        w = torch.zeros(min(rows, n - start), padded, dtype=torch.float32, device=device)
        w[:, :k] = weight[start : start + rows].detach().to(device, torch.float32)
        w[:, energy == 0] = 0  # inputs never seen: nothing to protect
        codes, scales, zeros = _gptq_rows(w, factor, energy, order, bits, block, symmetric, searched)
        codes[:, k:] = 0  # the padding's codes, as onnxruntime leaves them (never read: K is k)
        parts.append(to_blocks(codes.reshape(len(w), -1, block), scales, zeros, bits, symmetric))
    return BlockQuantized(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        None if symmetric else np.concatenate([p.zero_points for p in parts]),
    )


def _chunk_values(device: torch.device) -> int:
    """Weights rounded at once: on the GPU as many as a kernel fills (the per-column steps are
    launches), on the CPU what stays near the caches."""
    return 1 << 28 if device.type == "cuda" else 1 << 24


def _gptq_rows(w, factor, energy, order, bits: int, block: int, symmetric: bool, searched: bool):
    """GPTQ over rows `w` (rows, padded), updated in place: (codes, scales, zeros) with codes
    (rows, padded) uint8 by original column, grids (rows, blocks). `order` is act-order's column
    order (None: in order), `factor` the inverse Hessian's upper Cholesky factor in that order."""
    n, padded = w.shape
    blocks = padded // block
    top = (1 << bits) - 1
    device = w.device
    scales = torch.zeros(n, blocks, device=device)
    zeros = torch.zeros(n, blocks, device=device)
    if order is not None:
        # Static groups: every block's grid from the original weights, then the columns in
        # order of decreasing input energy.
        scales, zeros = _grid(w.reshape(n, blocks, block), energy.reshape(blocks, block), bits, symmetric, searched)
        w = w[:, order]
    columns_in_order = (order if order is not None else torch.arange(padded, device=device)).tolist()
    codes = torch.zeros(n, padded, dtype=torch.uint8, device=device)
    # A batch holds whole blocks, or a block holds whole batches: a block's grid is taken when
    # every column before it has pushed its error onto the block's columns.
    lazy = _LAZY_COLUMNS // block * block if block <= _LAZY_COLUMNS else _LAZY_COLUMNS
    if block % lazy and lazy % block:
        lazy = block
    scale = zero = inverse_scale = None
    for first in range(0, padded, lazy):
        last = min(first + lazy, padded)
        part = w[:, first:last].clone()
        errors = torch.zeros_like(part)
        inverse = factor[first:last, first:last]
        diagonal = torch.diagonal(inverse).tolist()
        for i in range(last - first):
            column = columns_in_order[first + i]
            if order is not None:
                if i == 0 or column // block != columns_in_order[first + i - 1] // block:
                    scale, zero = scales[:, column // block], zeros[:, column // block]
                    inverse_scale = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1), 0)
            elif column % block == 0:
                weights = energy[column : column + block]
                # the block's columns: in this batch, or (a block of several batches, i == 0)
                # in w, where the batches before have pushed their errors
                columns = part[:, i : i + block] if i + block <= last - first else w[:, column : column + block]
                scale, zero = _grid(columns, weights, bits, symmetric, searched)
                scales[:, column // block], zeros[:, column // block] = scale, zero
                inverse_scale = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1), 0)
            value = part[:, i]
            # encode(): floor(v / scale + zero + 0.5), clamped, in the same order of operations
            code = (value * inverse_scale).add_(zero).add_(0.5).floor_().clamp_(0, top)
            codes[:, column] = code.to(torch.uint8)
            error = (value - (code - zero) * scale).div_(diagonal[i])
            part[:, i:].addr_(error, inverse[i, i:], alpha=-1)
            errors[:, i] = error
        w[:, last:] -= errors @ factor[first:last, last:]
    return codes, scales, zeros
