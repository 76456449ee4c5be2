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
_LAZY_COLUMNS = 128  # columns rounded before their error is pushed to the rest in one matmul


def _inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 (dampened), which GPTQ's updates read row by row."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: nothing to protect
    h[dead, dead] = 1
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h += damping * torch.diagonal(h).mean() * eye
    for attempt in range(4):  # a nearly singular H: dampen more until it factors
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(inverse, upper=True).float()
        except torch.linalg.LinAlgError:
            h += (10**attempt) * damping * torch.diagonal(h).mean() * eye
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
    h = torch.zeros(padded, padded, dtype=torch.float64, device=device)
    h[:k, :k] = hessian.double()
    energy = torch.diagonal(h).float().clone()
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
    lazy = max(block, _LAZY_COLUMNS // block * block)  # whole blocks per lazy batch
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
                scale, zero = _grid(part[:, i : i + block], weights, bits, symmetric, searched)
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
