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

import torch

from surgery.analysis.quantization import BlockQuantized
from surgery.analysis.rounding import encode, range_grid, searched_grid, to_blocks

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
    nothing.
    """
    device = hessian.device
    n, k = weight.shape
    padded = -(-k // block) * block
    blocks = padded // block
    w = torch.zeros(n, padded, dtype=torch.float32, device=device)
    w[:, :k] = weight.detach().to(device, torch.float32)
    h = torch.zeros(padded, padded, dtype=torch.float32, device=device)
    h[:k, :k] = hessian.float()
    energy = torch.diagonal(h).clone()
    dead = energy == 0
    w[:, dead] = 0
    scales = torch.zeros(n, blocks, device=device)
    zeros = torch.zeros(n, blocks, device=device)
    order = torch.arange(padded, device=device)
    if act_order:
        # Static groups: every block's grid from the original weights, then the columns in
        # order of decreasing input energy.
        scales, zeros = _grid(w.reshape(n, blocks, block), energy.reshape(blocks, block), bits, symmetric, searched)
        order = torch.argsort(energy, descending=True, stable=True)
        w = w[:, order]
        h = h[order][:, order]
    factor = _inverse_hessian_factor(h, damping)
    codes = torch.zeros(n, padded, dtype=torch.int16, device=device)
    # A batch holds whole blocks, or a block holds whole batches: a block's grid is taken when
    # every column before it has pushed its error onto the block's columns.
    lazy = _LAZY_COLUMNS // block * block if block <= _LAZY_COLUMNS else _LAZY_COLUMNS
    if block % lazy and lazy % block:
        lazy = block
    scale = zero = None
    for first in range(0, padded, lazy):
        last = min(first + lazy, padded)
        part = w[:, first:last].clone()
        errors = torch.zeros_like(part)
        inverse = factor[first:last, first:last]
        for i in range(last - first):
            column = int(order[first + i])
            if act_order:
                scale, zero = scales[:, column // block], zeros[:, column // block]
            elif column % block == 0:
                weights = energy[column : column + block]
                # the block's columns: in this batch, or (a block of several batches, i == 0)
                # in w, where the batches before have pushed their errors
                columns = part[:, i : i + block] if i + block <= last - first else w[:, column : column + block]
                scale, zero = _grid(columns, weights, bits, symmetric, searched)
                scales[:, column // block], zeros[:, column // block] = scale, zero
            value = part[:, i]
            code = encode(value[:, None], scale, zero, bits)[:, 0]
            codes[:, column] = code.to(torch.int16)
            error = (value - (code - zero) * scale) / inverse[i, i]
            part[:, i:] -= error[:, None] * inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, last:] -= errors @ factor[first:last, last:]
    codes[:, k:] = 0  # the padding's codes, as onnxruntime leaves them (never read: K is k)
    return to_blocks(codes.reshape(n, blocks, block), scales, zeros, bits, symmetric)
