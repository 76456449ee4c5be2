"""Quantization that uses the calibration data, layer by layer: GPTQ, weighted grids, sensitivity.

The calibration tokens run through the model layer-major, as importance scoring does: a layer
is loaded (on `device` when given), every batch's hidden state passes through it with hooks on
the inputs of the linears being quantized, and the layer is released. What the hooks sum
depends on what the linear asked for:

- `gptq`: the input Hessian `X^T X`. The layer's GPTQ linears are rounded
  (`surgery.analysis.gptq`) and the batches pass through the layer again with the rounded
  weights, so that the next layer is calibrated on what the quantized model will feed it
  (GPTQ's sequential order).
- `weighted` (without gptq): the Hessian's diagonal, the mean squared activation of each input
  column; each block's grid is the one with the least error weighted by it
  (`surgery.analysis.rounding.quantize_searched`, llama.cpp's importance matrix). The
  activations are the float model's, as llama.cpp collects them: one pass.
- the preset's sensitivity (`sensitivity=` formats): the same diagonal, and the error each
  candidate format adds to the linear's output relative to the residual stream it perturbs
  (token by token),
  turned into KL divergence at the output by a probe that follows a few samples through a
  rounded copy of every layer (`surgery.analysis.sensitivity_probe`); the head's KL per format
  is measured directly. `surgery.analysis.mixed_precision` chooses from these.

On a CPU with bf16 units (`calibration_dtype`) the forwards compute in bf16, a layer's copy
cast for its pass (`surgery.ir.inputs.in_dtype`), and the float32 matmuls (the sums, GPTQ's
updates, the head's logits) in oneDNN's split-bf16 form (`fast_float32_matmuls`): what GPTQ
reads stays float32 (with the shortcuts below, a 1.5B model's 4.9-bit preset on 16,384
calibration tokens took 721 s against 1,730 s: docs/benchmarks.md). A GPTQ layer's first pass ends
once the last linear's input is summed (`AllInputsSeen`): its output is not used.

What is held: one layer, the batches' hidden states, one Hessian (or diagonal) per distinct
linear input, and the quantized blocks, which are the output's size. The result maps each
linear's exported name to its MatMulNBits blocks; the exporter writes them instead of rounding
to nearest, and the ONNX quantize pass's output is overwritten with them when the model was
quantized after export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch

from surgery.analysis.input_sums import AllInputsSeen, InputSums, input_module
from surgery.analysis.quantization import BlockQuantized
from surgery.analysis.rounding import (
    CHUNK_VALUES,
    padded_blocks,
    quantize_searched,
    range_grid,
    rounded,
    rounded_searched,
    squared_error,
)
from surgery.analysis.sensitivity_probe import REFERENCE, mean_kl, probe_rows, to_kl
from surgery.backend.verify_layerwise import fill_dequantized, linear_weights
from surgery.formats.names import HEAD, linear_layer
from surgery.formats.weights import QuantizedTarget, WeightFormat
from surgery.ir.graph import DecoderGraph, ReferenceSequence
from surgery.ir.inputs import calibration_batches, in_dtype, on_device
from surgery.progress import advance, counted

BATCH_ROWS = 8  # calibration samples per forward batch
Progress = Callable[[str], None]


Rounded = tuple[BlockQuantized, WeightFormat] | torch.Tensor  # blocks, or the (N, K) weight they stand for


@contextlib.contextmanager
def _rounded(graph: DecoderGraph, blocks: dict[str, Rounded]) -> Iterator[None]:
    """Within the block, the given linears compute with their rounded weights; restored after."""
    saved = []
    try:
        for linear, rounded in blocks.items():
            start = 0
            for weight in linear_weights(graph, linear):  # q, k and v are stacked by rows
                saved.append((weight, weight.data.clone()))
                n, k = weight.shape
                if isinstance(rounded, torch.Tensor):
                    part = rounded[start : start + n]
                else:
                    part = _dequantized(*rounded, k, start, n, weight.device)
                weight.data.copy_(part.to(weight.dtype))
                start += n
        yield
    finally:
        for weight, data in saved:
            weight.data.copy_(data)


def _weight(graph: DecoderGraph, linear: str, device: str | None) -> torch.Tensor:
    """A linear's (N, K) float32 weight (q, k and v stacked), on `device`; a single weight already
    there is not copied (a large head would be held twice). Nothing writes into it."""
    weights = [w.detach().to(device or "cpu", torch.float32) for w in linear_weights(graph, linear)]
    return weights[0] if len(weights) == 1 else torch.cat(weights)


def _dequantized(blocks: BlockQuantized, stored: WeightFormat, k: int, start: int, rows: int,
                 device: torch.device) -> torch.Tensor:  # fmt: skip
    """Rows start.. (`rows` of them) of the (N, K) weight `blocks` stand for, on `device`: on
    the CPU a chunk of rows at a time (small temporaries), on a GPU there (the packed bytes
    cross, not the floats)."""
    if device.type == "cpu":
        part = torch.empty(rows, k, dtype=torch.float32)
        fill_dequantized(part, blocks, k, stored, start)
        return part
    return stored.dequantize_rows(blocks, k, start, start + rows, device)


def _reference_rounded(weight: torch.Tensor) -> Rounded:
    """`weight` rounded to nearest in the probe's `REFERENCE` format: onnxruntime's packer on the
    CPU; on a GPU its grid (`range_grid`, the same) in torch, there (the CPU packer would take
    most of the sensitivity walk's time)."""
    if weight.device.type == "cpu":
        return REFERENCE.quantize(weight), REFERENCE
    n, k = weight.shape
    blocks = padded_blocks(weight, REFERENCE.block)
    grid = range_grid(blocks, REFERENCE.bits, REFERENCE.symmetric, REFERENCE.half_scales)
    return rounded(blocks, *grid, REFERENCE.bits).reshape(n, -1)[:, :k]


def _round(weight: torch.Tensor, target: QuantizedTarget, sums: torch.Tensor | None) -> BlockQuantized:
    """One linear rounded as its target asks: GPTQ against the Hessian `sums`, or to nearest on a
    grid searched against the activation energy `sums`, or (no sums) onnxruntime's range grid."""
    stored = target.format
    if target.gptq:
        return stored.quantize_gptq(weight, sums, searched=target.weighted, act_order=target.act_order)
    if target.weighted:
        return quantize_searched(weight, sums, stored.bits, stored.block, stored.symmetric, stored.half_scales)
    return stored.quantize(weight.cpu())


def _relative_errors(weight: torch.Tensor, energy: torch.Tensor, formats) -> dict:
    """What each format adds to the linear's output: sum_j energy_j * sum_i (W - Q(W))_ij^2
    (onnxruntime's range grid), `energy` relative to what the output perturbs
    (`InputSums.relative_energy`). A chunk of rows at a time, every format on it while it is
    in the caches (on the CPU; on a GPU at once)."""
    n, k = weight.shape
    rows = max(1, CHUNK_VALUES // k) if weight.device.type == "cpu" else n
    columns = {stored: torch.zeros(k, device=weight.device) for stored in formats}
    for start in range(0, n, rows):
        part = weight[start : start + rows]
        for stored in formats:
            blocks = padded_blocks(part, stored.block)
            grid = range_grid(blocks, stored.bits, stored.symmetric, stored.half_scales)
            squared = squared_error(blocks, *grid, stored.bits)
            columns[stored] += squared.reshape(len(part), -1)[:, :k].sum(0)
    return {stored: float((total * energy.to(total.device)).sum()) for stored, total in columns.items()}


@dataclass
class Calibration:
    """What a calibration walk produced: blocks by linear, and for the preset each linear's error
    per candidate format and its inputs' activation energy."""

    blocks: dict[str, BlockQuantized] = field(default_factory=dict)
    errors: dict[str, dict[WeightFormat, float]] = field(default_factory=dict)
    energies: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def calibrated_blocks(
    graph: DecoderGraph,
    targets: dict[str, QuantizedTarget],
    tokens: np.ndarray,
    progress: Progress = lambda _: None,
    device: str | None = None,
    sensitivity: tuple[WeightFormat, ...] = (),
    head_rounding: QuantizedTarget | None = None,
) -> Calibration:
    """GPTQ or weighted blocks for each linear of `targets` that asks for one (exported name ->
    target), and, for every target when `sensitivity` names formats, the error each of them adds
    (`_relative_errors`) and the activation energy; calibrated on `tokens` (samples, length),
    layer-major (see the module docstring). The head's errors are KL measured with it rounded as
    `head_rounding` says (GPTQ helps a head of many rows far more than a layer's linears)."""
    wanted = {linear: t for linear, t in targets.items() if t.gptq or t.weighted or sensitivity}
    runs = [ReferenceSequence(*(t.to(device) if device else t for t in batch))
            for batch in calibration_batches(tokens, BATCH_ROWS)]  # fmt: skip
    probe = None
    if sensitivity:  # the KL probe (surgery.analysis.sensitivity_probe): its samples, float and rounded
        rows = probe_rows(tokens)
        probe = ReferenceSequence(*(t.to(device) if device else t for t in calibration_batches(rows, len(rows))[0]))
    dtype = calibration_dtype(device)
    with fast_float32_matmuls(dtype):
        return _walk(graph, wanted, runs, probe, progress, device, sensitivity, head_rounding, dtype)


def _walk(graph, wanted, runs, probe, progress, device, sensitivity, head_rounding, dtype) -> Calibration:
    """`calibrated_blocks`' walk over the embedding, every layer and the head."""
    with graph.materialized(graph.embedding, device=device):
        hidden = [_cast(graph.embedding(run.input_ids), dtype) for run in runs]
        probed = [_cast(graph.embedding(probe.input_ids), dtype)] * 2 if probe is not None else []
    result = Calibration()
    by_layer: dict[int, list[str]] = {}
    for linear in wanted:
        if linear != HEAD:
            by_layer.setdefault(linear_layer(linear), []).append(linear)
    what = "GPTQ" if any(t.gptq for t in wanted.values()) else "activation statistics"
    rotary = [graph.rotary.module] if graph.rotary is not None else []
    description = f"{what}: {len(wanted)} linear(s) in {len(by_layer)} layer(s)"
    with counted(progress, description, len(graph.layers), "layer"), on_device(rotary, device):
        for layer in graph.each_layer_materialized():
            with on_device(layer.modules(), device):
                linears = {k: wanted[k] for k in by_layer.get(layer.index, [])}
                _layer(graph, layer, runs, hidden, linears, result, sensitivity, device, dtype)
                if probe is not None:
                    reference = {k: _reference_rounded(_weight(graph, k, device)) for k in linears}
                    with in_dtype(layer.modules(), dtype):
                        probed[0], _ = probe.through(layer, probed[0], graph.rotary, None)
                        with _rounded(graph, reference):
                            probed[1], _ = probe.through(layer, probed[1], graph.rotary, None)
    head_dtype = torch.float32 if dtype else None  # the head computes in its weights' type
    probed = [_cast(state, head_dtype) for state in probed]
    if HEAD in wanted:
        with graph.materialized(graph.head.final_norm, graph.head, device=device):
            gptq = wanted[HEAD].gptq or bool(sensitivity and head_rounding and head_rounding.gptq)
            sums = InputSums({}, {HEAD} if gptq else set())
            for state in hidden:  # the head's input only: the logits are never computed
                sums.add(HEAD, graph.head.final_norm(_cast(state, head_dtype)))
            hidden.clear()  # 100 MB for 16,384 tokens of a 1,536-wide model, not held while the head is rounded
            weight = _weight(graph, HEAD, device)
            if sensitivity:
                result.energies[HEAD] = sums.energy(HEAD)
                head_kl = {}
                how = head_rounding or QuantizedTarget(REFERENCE, weighted=True)
                with counted(progress, f"sensitivity of the head in {len(sensitivity)} formats", len(sensitivity),
                             "format"):  # fmt: skip
                    for stored in sensitivity:
                        # GPTQ where it changes the choice: an int4 head's KL falls 8x with it, an
                        # int8 head's is small either way. Its grids unsearched: measuring, not
                        # writing (the search costs as much again on a 150k-row head).
                        if how.gptq and stored.bits == 4:
                            plain = replace(how, format=stored, weighted=False, act_order=False)
                            blocks = _round(weight, plain, sums.sum(HEAD))
                            head_rounded = _dequantized(blocks, stored, weight.shape[1], 0, len(weight), weight.device)
                            del blocks  # packed, a sixth of the floats: not held while the KL is measured
                        else:  # a quick search: measuring, not writing
                            head_rounded = rounded_searched(weight, sums.energy(HEAD), stored.bits, stored.block,
                                                            stored.symmetric, half=stored.half_scales)  # fmt: skip
                        head_kl[stored] = mean_kl(graph.head, probed[0], probed[0], head_rounded.to(weight.device))
                        del head_rounded
                        advance("format")
                result.errors[HEAD] = head_kl
                to_kl(result.errors, mean_kl(graph.head, probed[0], probed[1]), head_kl, HEAD)
            if wanted[HEAD].gptq or wanted[HEAD].weighted:
                statistic = sums.sum(HEAD) if wanted[HEAD].gptq else sums.energy(HEAD)
                result.blocks[HEAD] = _round(weight, wanted[HEAD], statistic)
        progress(f"{what}: head")
    return result


def calibration_dtype(device: str | None) -> torch.dtype | None:
    """The element type the calibration's forwards compute in: bf16 on a CPU with native bf16
    matmuls (oneDNN on AVX512-BF16 or AMX: 4x fp32's rate, 821 against 196 GFLOPS on this
    project's two-core machine); otherwise None, the weights' own type (on a GPU the model's).
    The sums, grids and rounding stay float32 and read the weights as stored: bf16 carries the
    activations from layer to layer, as a bf16 model's own forward would."""
    if device is not None and torch.device(device).type != "cpu":
        return None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def walk_precision(device: str | None) -> dict[str, str]:
    """What the report says the calibration walk computed in (`calibration_dtype`)."""
    bf16 = calibration_dtype(device) is not None
    return {
        "device": device or "cpu",
        "forwards": "bf16" if bf16 else "as the weights are stored",
        "float32_matmuls": "split bf16 (torch's medium precision)" if bf16 else "float32",
    }


@contextlib.contextmanager
def fast_float32_matmuls(dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, with bf16 calibration (`calibration_dtype`), float32 matmuls run on oneDNN's
    bf16 units in split form (torch's "medium" precision): twice fp32's rate, and within 1.3e-6
    of it relative to the largest value (a 2,048 x 1,536 by 1,536 x 8,960 product; fp32's own
    rounding is 3.4e-7): the Hessians' sums, GPTQ's error updates and the head's logits.
    LAPACK's factorizations are not affected."""
    if dtype is None:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _cast(state: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return state if dtype is None else state.to(dtype)


def _layer(graph, layer, runs, hidden, linears: dict[str, QuantizedTarget], result: Calibration, sensitivity, device,
           dtype: torch.dtype | None):  # fmt: skip
    """One layer: its linears' input sums from the hidden states; rounded; the hidden states through
    it (again, with the rounded weights, when GPTQ rounded any: what the next layer will see).
    The forwards compute in `dtype` (None: the weights' own); the rounding reads the weights as
    they are."""
    computing = partial(in_dtype, layer.modules(), dtype)
    if not linears:
        with computing():
            for i, run in enumerate(runs):
                hidden[i], _ = run.through(layer, hidden[i], graph.rotary, None)
        return
    full = {linear for linear, t in linears.items() if t.gptq}
    sums = InputSums({linear: input_module(graph, linear) for linear in linears}, full)
    with sums.installed(), computing():
        for i, run in enumerate(runs):
            if sensitivity:
                energy = hidden[i].float().pow(2).sum(-1).reshape(-1)
                sums.token_weights = 1 / energy.clamp_min(torch.finfo(torch.float32).tiny)
            try:
                out, _ = run.through(layer, hidden[i], graph.rotary, None)
                if not full:
                    hidden[i] = out  # the float model's activations feed the next layer
            except AllInputsSeen:
                pass
            # With GPTQ this pass only sums the inputs (the rounded layer's pass feeds the next
            # layer), so once a whole batch has shown each linear called once, the later batches
            # stop at the last linear's input: a down projection's matmul is not computed.
            sums.stop_when_all_seen = bool(full) and (sums.stop_when_all_seen or sums.each_called_once())
            sums.next_batch()
    rounded: dict[str, tuple[BlockQuantized, WeightFormat]] = {}
    for linear, target in linears.items():
        weight = _weight(graph, linear, device)
        if sensitivity:
            result.energies[linear] = sums.energy(linear)
            result.errors[linear] = _relative_errors(weight, sums.relative_energy(linear), sensitivity)
        if target.gptq or target.weighted:
            statistic = sums.sum(linear) if target.gptq else sums.energy(linear)
            result.blocks[linear] = _round(weight, target, statistic)
            rounded[linear] = (result.blocks[linear], target.format)
    if full:
        with computing(), _rounded(graph, {linear: rounded[linear] for linear in full}):
            for i, run in enumerate(runs):
                hidden[i], _ = run.through(layer, hidden[i], graph.rotary, None)


@torch.no_grad()
def rounded_with_energy(
    graph: DecoderGraph, targets: dict[str, QuantizedTarget], energies: dict[str, torch.Tensor],
    progress: Progress = lambda _: None, device: str | None = None,
) -> dict[str, BlockQuantized]:  # fmt: skip
    """Weighted blocks for `targets` from activation energies measured earlier (the preset's
    second walk: its formats were chosen after the first), a layer at a time, no forward."""
    blocks: dict[str, BlockQuantized] = {}
    by_layer: dict[int, list[str]] = {}
    for linear in targets:
        if linear != HEAD:
            by_layer.setdefault(linear_layer(linear), []).append(linear)
    with counted(progress, f"rounding {len(targets)} linear(s) on searched grids", len(graph.layers), "layer"):
        for layer in graph.each_layer_materialized():
            for linear in by_layer.get(layer.index, []):
                blocks[linear] = _round(_weight(graph, linear, device), targets[linear], energies[linear])
    if HEAD in targets:
        with graph.materialized(graph.head):
            blocks[HEAD] = _round(_weight(graph, HEAD, device), targets[HEAD], energies[HEAD])
    return blocks
