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
from surgery.analysis.rounding import CHUNK_VALUES, range_grid, searched_grid, to_blocks

DAMPING = 0.01  # fraction of the Hessian's mean diagonal added to it (GPTQ's `percdamp`)
# Columns rounded before their error is pushed to the rest in one matmul (at most: a smaller
# block is a batch). GPTQ's reference takes 128; each column's update touches the rest of its
# batch, so on the CPU 32 is faster (a 151,936-row head: 20 s against 52 s on two cores); on
# the GPU a batch is one replayed CUDA graph.
_LAZY_COLUMNS = 32
_SPAN_COLUMNS = 512  # columns whose errors go onto the later columns together (_span_columns)


def _inverse_hessian_factor(hessian: torch.Tensor, damping: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (dampened; H^-1 = U^T U) with H's rows and columns
    taken in `order` (act-order; None: as they are), which GPTQ's updates read row by row.

    Computed in float32 (as GPTQ's reference does) from one Cholesky factorization and one
    triangular inverse (`_inverse_lower`): with P the order-reversing permutation and P H P = L L^T,
    H^-1 = (P L^-1 P)^T (P L^-1 P) and P L^-1 P is upper triangular. Forming H^-1 and factoring
    it again costs twice as much, in float64 four times (15 s against 6.5 s for an 8960-column
    down projection on two cores). The factorization runs in place on one reordered copy of H,
    the inverse into one more (its halves' products take a quarter each): an 8960-column Hessian
    is 321 MB, and the peak of a GPTQ
    walk is where it is factored."""
    size = hessian.shape[0]
    reverse = (order if order is not None else torch.arange(size, device=hessian.device)).flip(0)
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    extra = 1.0
    for attempt in range(4):  # a nearly singular H: dampen more until it factors
        flipped = hessian.float()[reverse[:, None], reverse[None, :]]  # P H P, one copy
        diagonal = flipped.diagonal()
        diagonal[diagonal == 0] = 1  # inputs never seen: nothing to protect
        diagonal.add_(extra * damping * diagonal.mean())
        torch.linalg.cholesky_ex(flipped, out=(flipped, info))
        if int(info) == 0:
            inverse = _inverse_lower(flipped)
            del flipped, diagonal
            return inverse.flip(0, 1)
        extra += 10**attempt
    raise ValueError("the calibration Hessian is not positive definite even after damping")


_SOLVED_SIZE = 1024  # a triangular block this small is inverted by one triangular solve


def _inverse_lower(lower: torch.Tensor) -> torch.Tensor:
    """The inverse of the lower triangular `lower`, by halves: [[A, 0], [C, D]]^-1 is
    [[A^-1, 0], [-D^-1 C A^-1, D^-1]], two matmuls a level (2/3 n^3 operations against a
    triangular solve's n^3 on the identity, at matmul speed: 2.25 s against 3.7 s for 8,960
    columns on two cores, 1.3 s under `fast_float32_matmuls`; relative error 3.2e-7 against
    float64, the solve's 1.9e-7)."""
    size = lower.shape[0]
    if size <= _SOLVED_SIZE:
        identity = torch.eye(size, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, identity, upper=False)
    half = size // 2
    inverse = torch.zeros_like(lower)
    inverse[:half, :half] = _inverse_lower(lower[:half, :half])
    inverse[half:, half:] = _inverse_lower(lower[half:, half:])
    inverse[half:, :half] = inverse[half:, half:] @ (lower[half:, :half] @ inverse[:half, :half])
    inverse[half:, :half].neg_()
    return inverse


def _grid(columns: torch.Tensor, importance: torch.Tensor, bits: int, symmetric: bool, searched: bool,
          half: bool):  # fmt: skip
    """(scale, zero) per row for the block `columns` (N, block); `half`: scales on fp16 values."""
    if searched:
        return searched_grid(columns, importance, bits, symmetric, half=half)
    return range_grid(columns, bits, symmetric, half)


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
    half: bool = False,
) -> BlockQuantized:
    """`weight` (N, K), PyTorch's (out, in) layout, rounded by GPTQ against `hessian` (K, K,
    the inputs' X^T X) onto MatMulNBits blocks of `block` input columns; what
    `quantize_blocks_nk` returns for round-to-nearest, in the same layout. Runs on the
    Hessian's device.

    Without act-order, blocks are chosen in order: a block's scale and zero point are taken
    from its columns once the errors of the blocks before it have been pushed onto them. K that
    is not a multiple of `block` is padded with zero columns (as onnxruntime pads), which cost
    nothing. Rows never exchange errors, so they are rounded a chunk at a time: a 150k-row head
    holds one chunk of float temporaries, not three copies of itself. `half`: every grid's
    scale is on an fp16 value, and the scales are returned as fp16.
    """
    device = hessian.device
    n, k = weight.shape
    padded = -(-k // block) * block
    h = hessian.float()
    if padded != k:
        h = torch.zeros(padded, padded, dtype=torch.float32, device=device)
        h[:k, :k] = hessian
    energy = torch.diagonal(h).clone()
    order = torch.argsort(energy, descending=True, stable=True) if act_order else None
    factor = _inverse_hessian_factor(h, damping, order)
    del h
    # Whole multiples of 64 rows: a column's kernels run over the rows with vector instructions
    # and a scalar tail, which may round differently; chunks that start on such a multiple
    # round every row as the whole weight would.
    rows = max(64, _chunk_values(device) // padded // 64 * 64)
    parts = []
    for start in range(0, n, rows):
        w = torch.zeros(min(rows, n - start), padded, dtype=torch.float32, device=device)
        w[:, :k] = weight[start : start + rows].detach().to(device, torch.float32)
        w[:, energy == 0] = 0  # inputs never seen: nothing to protect
        codes, scales, zeros = _gptq_rows(w, factor, energy, order, bits, block, symmetric, searched, half)
        codes[:, k:] = 0  # the padding's codes, as onnxruntime leaves them (never read: K is k)
        parts.append(to_blocks(codes.reshape(len(w), -1, block), scales, zeros, bits, symmetric, half))
    return BlockQuantized(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        None if symmetric else np.concatenate([p.zero_points for p in parts]),
    )


def _chunk_values(device: torch.device) -> int:
    """Weights rounded at once: on the GPU as many as a kernel fills (the per-column steps are
    launches), on the CPU what stays near the caches."""
    return 1 << 28 if device.type == "cuda" else 1 << 24


def _gptq_rows(w, factor, energy, order, bits: int, block: int, symmetric: bool, searched: bool, half: bool):
    """GPTQ over rows `w` (rows, padded), updated in place: (codes, scales, zeros) with codes
    (rows, padded) uint8 by original column, grids (rows, blocks). `order` is act-order's column
    order (None: in order), `factor` the inverse Hessian's upper Cholesky factor in that order.

    The columns go in lazy batches: a batch's columns are rounded one at a time, each pushing its
    error onto the rest of the batch (`_ColumnSteps`), then the batch's errors onto every later
    column in one matmul."""
    n, padded = w.shape
    blocks = padded // block
    device = w.device
    scales = torch.zeros(n, blocks, device=device)
    zeros = torch.zeros(n, blocks, device=device)
    if order is not None:
        # Static groups: every block's grid from the original weights, then the columns in
        # order of decreasing input energy.
        scales, zeros = _static_grids(w.reshape(n, blocks, block), energy.reshape(blocks, block), bits, symmetric,
                                      searched, half)  # fmt: skip
        w = w[:, order]
    codes = torch.zeros(n, padded, dtype=torch.uint8, device=device)
    lazy = _batch_columns(block)
    steps = _ColumnSteps(n, lazy, bits, device)
    inverse_scales = _inverse(scales) if order is not None else None
    span = _span_columns(block)
    span_errors = torch.empty(n, span, device=device)
    for start in range(0, padded, span):  # spans of whole blocks (the last may be shorter)
        end = min(start + span, padded)
        for first in range(start, end, lazy):  # a block is a whole number of batches (_batch_columns)
            last = first + lazy
            if order is None:  # the batch lies in one block
                if first % block == 0:  # the block's columns, where the batches before have pushed their errors
                    scale, zero = _grid(w[:, first : first + block], energy[first : first + block], bits, symmetric,
                                        searched, half)  # fmt: skip
                    scales[:, first // block], zeros[:, first // block] = scale, zero
                    inverse_scale = _inverse(scale)
                grid = (scale[:, None].expand(n, lazy), zero[:, None].expand(n, lazy),
                        inverse_scale[:, None].expand(n, lazy))  # fmt: skip
                where = slice(first, last)
            else:
                where = order[first:last]
                batch_blocks = where // block
                grid = (scales[:, batch_blocks], zeros[:, batch_blocks], inverse_scales[:, batch_blocks])
            errors, batch_codes = steps.run(w[:, first:last], factor[first:last, first:last], *grid)
            codes[:, where] = batch_codes.to(torch.uint8)
            span_errors[:, first - start : last - start] = errors
            w[:, last:end] -= errors @ factor[first:last, last:end]
        if end < padded:  # the span's errors onto every later column at once
            w[:, end:] -= span_errors[:, : end - start] @ factor[start:end, end:]
    return codes, scales, zeros


def _batch_columns(block: int) -> int:
    """Columns per lazy batch, dividing the block (so a padded weight is whole batches): a block
    smaller than a batch is a batch, so that each block's grid is taken, before its first column
    is rounded, from its columns as the columns before them have moved them; a larger block
    holds whole batches."""
    if block <= _LAZY_COLUMNS:
        return block
    return _LAZY_COLUMNS if block % _LAZY_COLUMNS == 0 else block


def _static_grids(blocks: torch.Tensor, importance: torch.Tensor, bits: int, symmetric: bool, searched: bool,
                  half: bool):  # fmt: skip
    """`_grid` of every block of `blocks` (N, blocks, block), a chunk of rows at a time on the
    CPU, so that the search's two dozen passes over a chunk read it from the caches and its
    temporaries stay small; on a GPU at once."""
    rows = max(1, CHUNK_VALUES // (blocks.shape[1] * blocks.shape[2])) if blocks.device.type == "cpu" else None
    if rows is None or rows >= len(blocks):
        return _grid(blocks, importance, bits, symmetric, searched, half)
    grids = [_grid(blocks[start : start + rows], importance, bits, symmetric, searched, half)
             for start in range(0, len(blocks), rows)]  # fmt: skip
    return torch.cat([g[0] for g in grids]), torch.cat([g[1] for g in grids])


def _span_columns(block: int) -> int:
    """Columns whose batches push their errors only onto each other, before the span's errors go
    onto every later column in one matmul (the blocked form of GPTQ's lazy updates). A rank-32
    update of all the remaining columns per batch reads and writes all of them and is
    memory-bound; one per span of 512 columns is arithmetic (a 1,536 x 8,960 down projection's
    column work: 3.7 s against 1.8 s on two cores). A whole number of blocks (so of batches), so
    a block's grid is taken from its columns once every column before it has pushed its error
    onto them."""
    return max(_SPAN_COLUMNS // block, 1) * block


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1), 0)


class _ColumnSteps:
    """One lazy batch of GPTQ's column steps on fixed buffers: column i is encoded on its grid
    (encode()'s order of operations: floor(v / scale + zero + 0.5), clamped), its error divided
    by the factor's diagonal and pushed onto columns i+1.. of the batch.

    On the GPU a step is a handful of small kernels whose launches, not their work, are the cost
    (15,104 columns a layer of a 1.5B model), so the batch's steps are captured once as a CUDA
    graph and replayed for every batch of the same width; on the CPU they run as they are. Both
    run the same kernels, so they write the same codes."""

    graphs = True  # on a CUDA device; False runs the steps as they are there too (tests compare)

    def __init__(self, rows: int, width: int, bits: int, device: torch.device):
        self.width, self.bits = width, bits
        # by column: each column's values are contiguous, as the kernels want them
        new = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        self.part, self.errors, self.codes = new(width, rows), new(width, rows), new(width, rows)
        self.scale, self.zero, self.inverse_scale = new(width, rows), new(width, rows), new(width, rows)
        self.inverse, self.diagonal = new(width, width), torch.ones(width, device=device)
        self.graph = None
        self.graphed = device.type == "cuda" and self.graphs

    def run(self, columns, inverse, scale, zero, inverse_scale):
        """(errors, codes as floats), both (rows, width), of the batch `columns` (rows, width)
        with the factor's block `inverse` and each column's grid `scale`, `zero` and
        `_inverse(scale)` (rows, width)."""
        if self.graphed and self.graph is None:  # before the batch's values: capturing runs the steps once
            self.graph = _captured(self._steps)
        self.part.copy_(columns.T)
        self.inverse.copy_(inverse)
        self.diagonal.copy_(torch.diagonal(inverse))
        self.scale.copy_(scale.T)
        self.zero.copy_(zero.T)
        self.inverse_scale.copy_(inverse_scale.T)
        if self.graphed:
            self.graph.replay()
        else:
            self._steps()
        return self.errors.T, self.codes.T

    def _steps(self) -> None:
        part, errors, codes, inverse, top = self.part, self.errors, self.codes, self.inverse, (1 << self.bits) - 1
        for i in range(self.width):
            value, code, error = part[i], codes[i], errors[i]
            torch.mul(value, self.inverse_scale[i], out=code)
            code.add_(self.zero[i]).add_(0.5).floor_().clamp_(0, top)
            torch.sub(code, self.zero[i], out=error)
            error.mul_(self.scale[i])
            torch.sub(value, error, out=error)
            error.div_(self.diagonal[i])
            part[i:].addr_(inverse[i, i:], error, alpha=-1)


def _captured(steps) -> torch.cuda.CUDAGraph:
    """`steps` recorded as a CUDA graph, after one warm-up run on a side stream (as capture needs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        steps()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps()
    return graph
