"""Verification of a model that never sits in memory whole: teacher-forced, layer by layer.

`surgery.backend.verify` decodes greedily in PyTorch with a KV cache, which needs every layer at every
step. Here the order is turned around so PyTorch needs each layer once:

1. onnxruntime prefills the prompts and greedily decodes `steps` tokens, keeping its logits
   (its session holds the exported model, which is what verification is about);
2. that session is closed, and PyTorch runs the prompts followed by onnxruntime's tokens as one
   sequence through `DecoderGraph.forward_layerwise`: a layer is loaded, every sequence goes
   through it, it is released;
3. `surgery.backend.verify.compare` compares onnxruntime's kept logits with PyTorch's at every
   position (a replay of the same tokens would compute them again), and counts the positions
   where onnxruntime's greedy token is not PyTorch's argmax (beyond a tie).

Without a cache PyTorch computes each position from the whole prefix, so the comparison also
checks onnxruntime's KV cache against a computation that has none.

A model quantized while it was written is checked in two parts. The exact part: the same model
with MatMulNBits computing in float (accuracy_level 0, a second small `model.onnx` over the same
data file) against PyTorch computing with the weights those blocks stand for (read back from the data
file), at the fp32 tolerance. The informational part: the model as written (int8 activations on CPU) against
PyTorch with the original weights, which is how far quantization moved the logits.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import torch

from surgery.analysis.quantization import BlockQuantized, producers_of, read_through_cast, stored_tensor
from surgery.backend.runtime import OnnxCausalLM, StepOutput
from surgery.backend.verify import PROMPTS, OnnxRun, ReferenceTrace, onnx_steps, prompt_batch
from surgery.backend.verify_cache import CodeCheck, read_back_variant
from surgery.formats.names import linear_layer, linear_of_packed_weight
from surgery.formats.weights import WeightFormat
from surgery.ir.graph import DecoderGraph, DecoderLayer
from surgery.ir.inputs import position_ids_from_mask
from surgery.nodes.embedding import Embedding

FLOAT_COMPUTE_MODEL = "model.float-compute.onnx"  # the exact part's twin, removed after use

Variant = Callable[[DecoderLayer | Embedding | None], contextlib.AbstractContextManager]


def onnx_greedy(model_path: str, ids: np.ndarray, mask: np.ndarray, steps: int, threads=None, providers=None,
                keep_cache: bool = False):  # fmt: skip
    """(tokens (steps, batch), the run): onnxruntime's greedy tokens after the prompts, and its
    outputs (logits only) of the prefill and of a decode step after each token; with
    `keep_cache`, also the KV cache after the last step (a quantized cache's codes)."""
    model = OnnxCausalLM(model_path, threads=threads, low_memory=True, providers=providers)
    tokens: list[np.ndarray] = []

    def choose(step: int, out) -> np.ndarray:
        tokens.append(out.logits[:, -1].argmax(-1))
        return tokens[-1]

    # The KV cache is dropped from what is kept (only the logits are compared), but the last.
    outputs, last = [], None
    for out in onnx_steps(model, ids, mask, choose, steps):
        outputs.append(StepOutput(out.logits, []))
        last = out
    cache = [p.numpy() if hasattr(p, "numpy") else np.asarray(p) for p in last.present] if keep_cache else None
    chosen = np.stack(tokens) if tokens else np.zeros((0, len(ids)), np.int64)
    return chosen, OnnxRun(outputs, model.uses_cache, cache)


def teacher_forced_traces(
    graph: DecoderGraph,
    tokenizer,
    runs: list[tuple[str, Variant | None]],
    steps: int,
    kv_cache: bool,
    padded: bool = True,
    threads: int | None = None,
    providers: list[str] | None = None,
    prompts: tuple[str, ...] = PROMPTS,
    device: str | None = None,
    read_back: list[CodeCheck] | None = None,
) -> list[tuple[ReferenceTrace, OnnxRun]]:
    """One ReferenceTrace per (onnx model path, PyTorch variant): onnxruntime's greedy tokens on
    that model, and PyTorch's logits at every position of prompts + tokens, all runs computed
    in one layer-major pass; with each, onnxruntime's recorded run, which `compare` takes instead
    of replaying (the trace's inputs are exactly what onnxruntime was fed). With `read_back` (one
    CodeCheck per run), a quantized KV cache's attention reads onnxruntime's codes and each
    run's CodeCheck counts how they differ from PyTorch's rounding."""
    started = time.perf_counter()
    ids, mask = (t.numpy() for t in prompt_batch(tokenizer, prompts, padded))
    keep = read_back is not None
    greedy = [onnx_greedy(path, ids, mask, steps, threads, providers, keep) for path, _ in runs]
    if keep:  # a quantized KV cache: PyTorch reads onnxruntime's codes (surgery.backend.verify_cache)
        runs = [(path, _both(variant, read_back_variant(graph, run.cache, check)))
                for (path, variant), (_, run), check in zip(runs, greedy, read_back, strict=True)]  # fmt: skip
    fed = [tokens for tokens, _ in greedy]
    batches = []
    for tokens in fed:
        full_ids = torch.from_numpy(np.concatenate([ids, tokens.T.astype(np.int64)], axis=1))
        full_mask = torch.from_numpy(np.concatenate([mask, np.ones_like(tokens.T)], axis=1))
        batches.append((full_ids, full_mask, position_ids_from_mask(full_mask)))
    variants = [variant or (lambda _: contextlib.nullcontext()) for _, variant in runs]
    logits = graph.forward_layerwise(batches, variants=variants, device=device)
    prompt = ids.shape[1]
    seconds = time.perf_counter() - started
    traces = []
    for tokens, out in zip(fed, logits, strict=True):
        out = out.float().cpu().numpy()
        traces.append(
            ReferenceTrace(
                prompts=prompts,
                input_ids=ids,
                attention_mask=mask,
                tokens=tokens,
                prefill_logits=out[:, :prompt],
                # The logits after feeding token s: what the decode step that fed it returns.
                step_logits=np.ascontiguousarray(out[:, prompt:].transpose(1, 0, 2)),
                kv_cache=kv_cache,
                seconds=seconds,
            )
        )
    return [(trace, run) for trace, (_, run) in zip(traces, greedy, strict=True)]


def _both(first: Variant | None, second: Variant) -> Variant:
    """A variant that applies `first` (if any) and then `second` to a layer's pass."""

    @contextlib.contextmanager
    def variant(layer):
        with (first or (lambda _: contextlib.nullcontext()))(layer), second(layer):
            yield

    return variant


def linear_owner(graph: DecoderGraph, linear: str) -> tuple[torch.nn.Module, str]:
    """(attention, short convolution or MLP node, projection) behind a layer's exported linear name
    (`model.layers.<i>.<self_attn|conv|mlp>.<projection>`; `qkv_proj` is q, k and v packed)."""
    _, _, number, block, leaf = linear.split(".")
    layer = graph.layer(int(number))
    return (layer.mlp if block == "mlp" else layer.attention), leaf


def linear_weights(graph: DecoderGraph, linear: str) -> list[torch.nn.Parameter]:
    """The PyTorch weights behind an exported linear layer's name (`surgery.export.decoder`):
    `lm_head`, `model.layers.<i>.self_attn.qkv_proj` (q, k and v stacked by output), or
    `model.layers.<i>.<self_attn|mlp>.<projection>`."""
    if linear == "lm_head":
        return [graph.head.weight]
    sub, leaf = linear_owner(graph, linear)
    if leaf == "qkv_proj":
        return [sub.q_proj.weight, sub.k_proj.weight, sub.v_proj.weight]
    return [getattr(sub, leaf).weight]


def fill_dequantized(target: torch.Tensor, blocks: BlockQuantized, k: int, stored: WeightFormat, start: int) -> None:
    """Write rows `start`.. of the (N, K) weight `blocks` (in format `stored`) stand for into
    `target` (as many rows as it has), a chunk of rows at a time so the float temporaries stay small."""
    step = max(1, _ROWS_BYTES // (4 * k))
    for first in range(0, target.shape[0], step):
        last = min(first + step, target.shape[0])
        target[first:last] = stored.dequantize_rows(blocks, k, start + first, start + last)


class WrittenBlocks:
    """The MatMulNBits weights of a written model, read from its data file when asked for."""

    def __init__(self, model_path: str):
        model = onnx.load(model_path, load_external_data=False)
        self.folder = os.path.dirname(model_path)
        self.graph_nodes = list(model.graph.node)
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.producers = producers_of(model.graph)
        # linear name -> its node; the exporter names the packed weight `<linear>.weight_Q<bits>`.
        self.nodes = {
            linear_of_packed_weight(node.input[1]): node for node in model.graph.node if node.op_type == "MatMulNBits"
        }

    def _array(self, name: str) -> np.ndarray:
        """One initializer's values, read from the data file (or the graph, when small)."""
        init = self.initializers[name]
        if init.data_location != onnx.TensorProto.EXTERNAL:
            return onnx.numpy_helper.to_array(init)
        where = {entry.key: entry.value for entry in init.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        count = int(np.prod(init.dims))
        path = os.path.join(self.folder, where["location"])
        return np.fromfile(path, dtype, count, offset=int(where.get("offset", 0))).reshape(tuple(init.dims))

    def lookup(self) -> tuple[BlockQuantized, int, WeightFormat] | None:
        """(the blocks, hidden size, the weight format) of a GatherBlockQuantized embedding, read
        through the Reshapes of a tied head's tensors; None when the lookup is a float Gather."""
        node = next((n for n in self.graph_nodes if n.op_type == "GatherBlockQuantized"), None)
        if node is None:
            return None
        names = [stored_tensor(name, self.producers) if name else name for name in node.input[:1] + node.input[2:4]]
        attributes = {a.name: a.i for a in node.attribute}
        packed, scales = self._array(names[0]), self._array(names[1])
        rows = packed.shape[0]
        half = read_through_cast(node.input[2], self.producers)
        stored = WeightFormat.of_node(attributes, len(names) > 2 and bool(names[2]), half)
        zero_points = self._array(names[2]).reshape(rows, -1) if stored.symmetric is False else None
        hidden = packed.size * 8 // stored.bits // rows
        blocks = BlockQuantized(packed.reshape(rows, hidden // stored.block, -1), scales.reshape(rows, -1), zero_points)
        return blocks, hidden, stored

    def blocks(self, linear: str) -> tuple[BlockQuantized, int, WeightFormat]:
        """(the blocks, K, the weight format) of a quantized linear."""
        node = self.nodes[linear]
        attributes = {a.name: a.i for a in node.attribute}
        names = [stored_tensor(name, self.producers) if name else name for name in node.input]
        zero_points = self._array(names[3]) if len(names) > 3 and names[3] else None
        blocks = BlockQuantized(self._array(names[1]), self._array(names[2]), zero_points)
        half = read_through_cast(node.input[2], self.producers)
        return blocks, attributes["K"], WeightFormat.of_node(attributes, zero_points is not None, half)




def written_weights(graph: DecoderGraph, model_path: str) -> Variant:
    """A variant under which a layer's (or, for None, the head's) quantized linears compute with
    the weights the written model holds: its MatMulNBits blocks, read back from the data file and
    dequantized. So verification checks the bytes that were written, not a recomputation.

    A weight loaded from the checkpoint is overwritten in place and released afterwards (its
    next load reads the checkpoint's values), so no second copy is made (a 2 GB head stays
    2 GB); the variant must then be the last to read a layer, which is how the pipeline orders
    `teacher_forced_traces` runs. A weight held in memory is replaced by a copy and restored.
    """
    written = WrittenBlocks(model_path)
    lookup = written.lookup()
    by_layer: dict[int | None, list[str]] = {}
    for linear in written.nodes:
        by_layer.setdefault(linear_layer(linear), []).append(linear)
    weights = graph.weights

    @contextlib.contextmanager
    def variant(layer: DecoderLayer | Embedding | None) -> Iterator[None]:
        if isinstance(layer, Embedding):
            # The lookup's rows as written, in a copy (other batches read the table in the same
            # block; a tied head's weight is this very tensor).
            if lookup is None:
                yield
                return
            blocks, hidden, stored = lookup
            table, original = layer.weight, layer.weight.data
            rows = torch.empty(original.shape, dtype=torch.float32)
            fill_dequantized(rows, blocks, hidden, stored, 0)
            table.data = rows.to(original.device, original.dtype)
            try:
                yield
            finally:
                table.data = original
            return
        saved, spent = [], []
        try:
            for linear in by_layer.get(layer.index if layer else None, ()):
                blocks, k, stored = written.blocks(linear)
                start = 0
                for weight in linear_weights(graph, linear):  # q, k and v are stacked by rows
                    stop = start + weight.shape[0]
                    in_place = weights is not None and weights.knows(weight)
                    target = weight.data if in_place else torch.empty_like(weight.data)
                    fill_dequantized(target, blocks, k, stored, start)
                    if in_place:
                        spent.append(weight)
                    else:
                        saved.append((weight, weight.data))
                        weight.data = target
                    start = stop
            yield
        finally:
            for weight, data in saved:
                weight.data = data
            if spent:
                weights.release(spent)

    return variant


_ROWS_BYTES = 32 << 20  # rows dequantized at a time


def float_compute_twin(folder: str) -> str:
    """A `model.onnx` beside the output's, over the same data file, whose MatMulNBits compute in
    float (accuracy_level 0); returns its path. Only the graph is copied (kilobytes)."""
    model = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
    path = os.path.join(folder, FLOAT_COMPUTE_MODEL)
    onnx.save(model, path)
    return path
