"""Calibrated (GPTQ) quantization of a model's linear layers, layer by layer.

The calibration tokens run through the model layer-major, as importance scoring does
(`DecoderGraph.forward_layerwise`): a layer is loaded, every batch's hidden state passes
through it once with hooks summing each quantized linear's input Hessian `X^T X`, its linears
are rounded by GPTQ (`surgery.analysis.gptq`), and the batches pass through it again with the rounded
weights, so that the next layer is calibrated on what the quantized model will feed it (GPTQ's
sequential order). Then the layer is released. What is held: one layer, the batches' hidden
states, one Hessian per distinct linear input, and the quantized blocks, which are the output's
size.

The result maps each linear's exported name to its MatMulNBits blocks; the exporter writes
them instead of rounding to nearest (`export_decoder(..., calibrated=)`), and the ONNX quantize
pass's output is overwritten with them when the model was quantized after export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from surgery.analysis.quantization import BlockQuantized
from surgery.backend.verify_layerwise import fill_dequantized, linear_owner, linear_weights
from surgery.formats.names import HEAD, linear_layer
from surgery.formats.weights import WeightFormat
from surgery.ir.graph import DecoderGraph, ReferenceSequence
from surgery.ir.inputs import calibration_batches
from surgery.progress import counted

BATCH_ROWS = 8  # calibration samples per forward batch


def input_module(graph: DecoderGraph, linear: str) -> torch.nn.Module:
    """The module whose input is a layer's exported linear's input: q_proj for the packed QKV,
    the projection itself otherwise."""
    sub, leaf = linear_owner(graph, linear)
    return sub.q_proj if leaf == "qkv_proj" else getattr(sub, leaf)


class _Hessians:
    """Sums `X^T X` of the inputs of some modules while installed (forward pre-hooks).

    Linears that read the same tensor (gate and up read the normalized residual) share one
    sum, so it is computed once per batch.
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self._sums: dict[str, torch.Tensor] = {}
        self._shared: dict[str, str] = {}  # linear -> the linear whose sum it reads
        # This batch's inputs, by id, with the linear that summed each; holding them keeps a
        # freed input's memory (and id) from being reused by a later one within the batch.
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}

    def next_batch(self) -> None:
        """Forget this batch's inputs."""
        self._seen.clear()

    def sum(self, linear: str) -> torch.Tensor:
        """The summed `X^T X` of `linear`'s inputs."""
        return self._sums[self._shared.get(linear, linear)]

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        for linear, module in self.modules.items():

            def hook(_module, args, linear=linear):
                x = args[0]
                seen = self._seen.get(id(x))
                if seen is not None and seen[1] != linear:
                    self._shared[linear] = seen[1]  # the very tensor another linear summed
                    return
                self._seen[id(x)] = (x, linear)
                x = x.reshape(-1, x.shape[-1]).float()
                total = self._sums.get(linear)
                self._sums[linear] = x.T @ x if total is None else total.addmm_(x.T, x)

            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _rounded(graph: DecoderGraph, blocks: dict[str, tuple[BlockQuantized, WeightFormat]]) -> Iterator[None]:
    """Within the block, the given linears compute with their rounded weights; restored after."""
    saved = []
    try:
        for linear, (quantized, stored) in blocks.items():
            start = 0
            for weight in linear_weights(graph, linear):  # q, k and v are stacked by rows
                saved.append((weight, weight.data.clone()))
                fill_dequantized(weight.data, quantized, weight.shape[1], stored, start)
                start += weight.shape[0]
        yield
    finally:
        for weight, data in saved:
            weight.data.copy_(data)


@torch.no_grad()
def calibrated_blocks(
    graph: DecoderGraph,
    settings: dict[str, WeightFormat],
    tokens: np.ndarray,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, BlockQuantized]:
    """GPTQ blocks for each linear of `settings` (exported name -> its WeightFormat),
    calibrated on `tokens` (samples, length), layer-major (see the module docstring)."""
    runs = [ReferenceSequence(*batch) for batch in calibration_batches(tokens, BATCH_ROWS)]
    with graph.materialized(graph.embedding):
        hidden = [graph.embedding(run.input_ids) for run in runs]
    result: dict[str, BlockQuantized] = {}

    def quantize(linear: str, hessian: torch.Tensor) -> tuple[BlockQuantized, WeightFormat]:
        stored = settings[linear]
        weight = torch.cat([w.detach().float() for w in linear_weights(graph, linear)])
        result[linear] = stored.quantize_gptq(weight, hessian)
        return result[linear], stored

    by_layer: dict[int, list[str]] = {}
    for linear in settings:
        if linear != HEAD:
            by_layer.setdefault(linear_layer(linear), []).append(linear)
    with counted(progress, f"GPTQ: {len(settings)} linear(s) in {len(by_layer)} layer(s)", len(graph.layers), "layer"):
        _through_layers(graph, runs, hidden, by_layer, quantize)
    if "lm_head" in settings:
        with graph.materialized(graph.head.final_norm, graph.head):
            hessian = None
            for state in hidden:
                x = graph.head.final_norm(state).reshape(-1, state.shape[-1]).float()
                hessian = x.T @ x if hessian is None else hessian.addmm_(x.T, x)
            quantize("lm_head", hessian)
        progress("GPTQ: head")
    return result


def _through_layers(graph, runs, hidden, by_layer, quantize) -> None:
    """Each layer in turn: its linears' Hessians from the hidden states, rounded, then the hidden
    states through the rounded layer (what the next layer's linears will see)."""
    for layer in graph.each_layer_materialized():
        linears = by_layer.get(layer.index, [])
        rounded: dict[str, tuple[BlockQuantized, WeightFormat]] = {}
        if linears:
            hessians = _Hessians({linear: input_module(graph, linear) for linear in linears})
            with hessians.installed():
                for i, run in enumerate(runs):
                    run.through(layer, hidden[i], graph.rotary, None)
                    hessians.next_batch()
            rounded = {linear: quantize(linear, hessians.sum(linear)) for linear in linears}
        with _rounded(graph, rounded):
            for i, run in enumerate(runs):
                hidden[i], _ = run.through(layer, hidden[i], graph.rotary, None)
