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

import numpy as np
import torch

from surgery.analysis.quantization import BlockQuantized
from surgery.analysis.rounding import (
    padded_blocks,
    quantize_searched,
    range_grid,
    rounded,
    rounded_searched,
    squared_error,
)
from surgery.analysis.sensitivity_probe import REFERENCE, mean_kl, probe_rows, to_kl
from surgery.backend.verify_layerwise import fill_dequantized, linear_owner, linear_weights
from surgery.formats.names import HEAD, linear_layer
from surgery.formats.weights import QuantizedTarget, WeightFormat
from surgery.ir.graph import DecoderGraph, ReferenceSequence
from surgery.ir.inputs import calibration_batches, on_device
from surgery.progress import advance, counted

BATCH_ROWS = 8  # calibration samples per forward batch
Progress = Callable[[str], None]


def input_module(graph: DecoderGraph, linear: str) -> torch.nn.Module:
    """The module whose input is a layer's exported linear's input: q_proj for the packed QKV,
    the projection itself otherwise."""
    sub, leaf = linear_owner(graph, linear)
    return sub.q_proj if leaf == "qkv_proj" else getattr(sub, leaf)


class _InputSums:
    """Sums of the inputs of some modules while installed (forward pre-hooks): `X^T X` for the
    linears in `full`, its diagonal (the sum of squares per column) for the others, and the count
    of input rows.

    Linears that read the same tensor (gate and up read the normalized residual) share one
    sum, so it is computed once per batch.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], full: set[str]):
        self.modules = modules
        self.full = full
        self._sums: dict[str, torch.Tensor] = {}
        self._relative: dict[str, torch.Tensor] = {}  # diagonal sums, each row over its token's residual energy
        self.token_weights: torch.Tensor | None = None  # this batch's 1 / |h_t|^2 per token, when known
        self.rows: dict[str, int] = {}
        self._shared: dict[str, str] = {}  # linear -> the linear whose sum it reads
        # This batch's inputs, by id, with the linear that summed each; holding them keeps a
        # freed input's memory (and id) from being reused by a later one within the batch.
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}

    def next_batch(self) -> None:
        """Forget this batch's inputs."""
        self._seen.clear()

    def sum(self, linear: str) -> torch.Tensor:
        """The summed `X^T X` (or its diagonal) of `linear`'s inputs."""
        return self._sums[self._shared.get(linear, linear)]

    def energy(self, linear: str) -> torch.Tensor:
        """The mean squared activation of each input column (the Hessian's diagonal per row)."""
        total = self.sum(linear)
        diagonal = torch.diagonal(total) if total.dim() == 2 else total
        return diagonal / max(1, self.rows[self._shared.get(linear, linear)])

    def add(self, linear: str, x: torch.Tensor) -> None:
        """Add the rows of one input of `linear` to its sum."""
        x = x.reshape(-1, x.shape[-1]).float()
        total = self._sums.get(linear)
        self.rows[linear] = self.rows.get(linear, 0) + x.shape[0]
        if linear in self.full:
            self._sums[linear] = x.T @ x if total is None else total.addmm_(x.T, x)
        else:
            squares = x * x
            self._sums[linear] = squares.sum(0) if total is None else total.add_(squares.sum(0))
            weights = self.token_weights
            if weights is not None and weights.numel() == x.shape[0]:
                relative = (squares * weights[:, None]).sum(0)
                previous = self._relative.get(linear)
                self._relative[linear] = relative if previous is None else previous.add_(relative)

    def relative_energy(self, linear: str) -> torch.Tensor:
        """Per input column, the mean over tokens of its squared activation divided by the energy
        of the token's residual stream entering the layer: the weights under which the error a
        rounded weight adds to the output is relative to what it perturbs, token by token (a few
        tokens carry residuals hundreds of times larger than the rest, the "massive
        activations" of most LLMs, and would otherwise dominate a mean over tokens)."""
        name = self._shared.get(linear, linear)
        return self._relative[name] / max(1, self.rows[name])

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        for linear, module in self.modules.items():

            def hook(_module, args, linear=linear):
                x = args[0]
                seen = self._seen.get(id(x))
                if seen is not None and seen[1] != linear and (seen[1] in self.full) == (linear in self.full):
                    self._shared[linear] = seen[1]  # the very tensor another linear summed the same way
                    return
                self._seen[id(x)] = (x, linear)
                self.add(linear, x)

            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


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
    (`_InputSums.relative_energy`)."""
    errors = {}
    for stored in formats:
        blocks = padded_blocks(weight, stored.block)
        grid = range_grid(blocks, stored.bits, stored.symmetric, stored.half_scales)
        squared = squared_error(blocks, *grid, stored.bits)
        squared = squared.reshape(weight.shape[0], -1)[:, : weight.shape[1]].sum(0)
        errors[stored] = float((squared * energy.to(squared.device)).sum())
    return errors


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
    with graph.materialized(graph.embedding, device=device):
        hidden = [graph.embedding(run.input_ids) for run in runs]
        probed = [graph.embedding(probe.input_ids)] * 2 if probe is not None else []
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
                _layer(graph, layer, runs, hidden, linears, result, sensitivity, device)
                if probe is not None:
                    probed[0], _ = probe.through(layer, probed[0], graph.rotary, None)
                    reference = {k: _reference_rounded(_weight(graph, k, device)) for k in linears}
                    with _rounded(graph, reference):
                        probed[1], _ = probe.through(layer, probed[1], graph.rotary, None)
    if HEAD in wanted:
        with graph.materialized(graph.head.final_norm, graph.head, device=device):
            gptq = wanted[HEAD].gptq or bool(sensitivity and head_rounding and head_rounding.gptq)
            sums = _InputSums({}, {HEAD} if gptq else set())
            for state in hidden:  # the head's input only: the logits are never computed
                sums.add(HEAD, graph.head.final_norm(state))
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


def _layer(graph, layer, runs, hidden, linears: dict[str, QuantizedTarget], result: Calibration, sensitivity, device):
    """One layer: its linears' input sums from the hidden states; rounded; the hidden states through
    it (again, with the rounded weights, when GPTQ rounded any: what the next layer will see)."""
    if not linears:
        for i, run in enumerate(runs):
            hidden[i], _ = run.through(layer, hidden[i], graph.rotary, None)
        return
    full = {linear for linear, t in linears.items() if t.gptq}
    sums = _InputSums({linear: input_module(graph, linear) for linear in linears}, full)
    with sums.installed():
        for i, run in enumerate(runs):
            if sensitivity:
                energy = hidden[i].float().pow(2).sum(-1).reshape(-1)
                sums.token_weights = 1 / energy.clamp_min(torch.finfo(torch.float32).tiny)
            out, _ = run.through(layer, hidden[i], graph.rotary, None)
            if not full:
                hidden[i] = out  # the float model's activations feed the next layer
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
        with _rounded(graph, {linear: rounded[linear] for linear in full}):
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
