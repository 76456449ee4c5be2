"""Verification of a model that never sits in memory whole: teacher-forced, layer by layer.

`surgery.verify` decodes greedily in PyTorch with a KV cache, which needs every layer at every
step. Here the order is turned around so PyTorch needs each layer once:

1. onnxruntime prefills the prompts and greedily decodes `steps` tokens (its session holds the
   exported model, which is what verification is about);
2. that session is closed, and PyTorch runs the prompts followed by onnxruntime's tokens as one
   sequence through `DecoderGraph.forward_layerwise`: a layer is loaded, every sequence goes
   through it, it is released;
3. `surgery.verify.compare` replays onnxruntime on the same tokens and compares the logits at
   every position, and counts the positions where onnxruntime's greedy token is not PyTorch's
   argmax (beyond a tie).

Without a cache PyTorch computes each position from the whole prefix, so the comparison also
checks onnxruntime's KV cache against a computation that has none.

A model quantized while it was written is checked in two parts. The exact part: the same model
with MatMulNBits computing in float (accuracy_level 0, a second small `model.onnx` over the same
data file) against PyTorch computing with the weights those blocks stand for, at the fp32
tolerance. The informational part: the model as written (int8 activations on CPU) against
PyTorch with the original weights, which is how far quantization moved the logits.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import torch

from surgery.models.graph import DecoderGraph, DecoderLayer, position_ids_from_mask
from surgery.quantization import fake_quantize_nk
from surgery.runtime import OnnxCausalLM
from surgery.verify import PROMPTS, ReferenceTrace, onnx_steps, prompt_batch

FLOAT_COMPUTE_MODEL = "model.float-compute.onnx"  # the exact part's twin, removed after use

Variant = Callable[[DecoderLayer | None], contextlib.AbstractContextManager]


def onnx_greedy_tokens(model_path: str, ids: np.ndarray, mask: np.ndarray, steps: int, threads=None, providers=None):
    """(steps, batch): onnxruntime's greedy tokens after the prompts."""
    model = OnnxCausalLM(model_path, threads=threads, low_memory=True, providers=providers)
    tokens: list[np.ndarray] = []

    def choose(step: int, out) -> np.ndarray:
        tokens.append(out.logits[:, -1].argmax(-1))
        return tokens[-1]

    # The last token needs no forward of its own: `steps - 1` decode steps choose `steps` tokens.
    last = deque(onnx_steps(model, ids, mask, choose, steps - 1), maxlen=1)[0]
    if steps:
        choose(steps, last)
    return np.stack(tokens) if tokens else np.zeros((0, len(ids)), np.int64)


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
) -> list[ReferenceTrace]:
    """One ReferenceTrace per (onnx model path, PyTorch variant): onnxruntime's greedy tokens on
    that model, and PyTorch's logits at every position of prompts + tokens, all runs computed
    in one layer-major pass."""
    started = time.perf_counter()
    ids, mask = (t.numpy() for t in prompt_batch(tokenizer, prompts, padded))
    fed = [onnx_greedy_tokens(path, ids, mask, steps, threads, providers) for path, _ in runs]
    batches = []
    for tokens in fed:
        full_ids = torch.from_numpy(np.concatenate([ids, tokens.T.astype(np.int64)], axis=1))
        full_mask = torch.from_numpy(np.concatenate([mask, np.ones_like(tokens.T)], axis=1))
        batches.append((full_ids, full_mask, position_ids_from_mask(full_mask)))
    variants = [variant or (lambda _: contextlib.nullcontext()) for _, variant in runs]
    logits = graph.forward_layerwise(batches, variants=variants)
    prompt = ids.shape[1]
    seconds = time.perf_counter() - started
    traces = []
    for tokens, out in zip(fed, logits, strict=True):
        out = out.float().numpy()
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
    return traces


def linear_weights(graph: DecoderGraph, linear: str) -> list[torch.nn.Parameter]:
    """The PyTorch weights behind an exported linear layer's name (`surgery.export.decoder`):
    `lm_head`, `model.layers.<i>.self_attn.qkv_proj` (q, k and v stacked by output), or
    `model.layers.<i>.<self_attn|mlp>.<projection>`."""
    if linear == "lm_head":
        return [graph.head.weight]
    _, _, number, block, leaf = linear.split(".")
    layer = graph.layer(int(number))
    sub = layer.attention if block == "self_attn" else layer.mlp
    if leaf == "qkv_proj":
        return [sub.q_proj.weight, sub.k_proj.weight, sub.v_proj.weight]
    return [getattr(sub, leaf).weight]


def fake_quantized(graph: DecoderGraph, assignment: tuple[tuple[str, int, int, bool], ...]) -> Variant:
    """A variant under which a layer's (or, for None, the head's) quantized linears compute with
    the weights their MatMulNBits blocks stand for.

    Blocks run along the input dimension within one output row, so quantizing q, k and v apart
    gives exactly the blocks of their stacked MatMul. A weight loaded from the checkpoint is
    quantized in place and released afterwards (its next load reads the checkpoint's values), so
    no second copy is made (a 2 GB head stays 2 GB); the variant must then be the last to read
    a layer: `teacher_forced_traces` runs come in order. A weight held in memory is replaced by
    a quantized copy and restored.
    """
    by_layer: dict[int | None, list[tuple[str, int, int, bool]]] = {}
    for linear, bits, block, symmetric in assignment:
        key = None if linear == "lm_head" else int(linear.split(".")[2])
        by_layer.setdefault(key, []).append((linear, bits, block, symmetric))
    weights = graph.weights

    @contextlib.contextmanager
    def variant(layer: DecoderLayer | None) -> Iterator[None]:
        saved, spent = [], []
        try:
            for linear, bits, block, symmetric in by_layer.get(layer.index if layer else None, ()):
                for weight in linear_weights(graph, linear):
                    if weights is not None and weights.knows(weight):
                        fake_quantize_nk(weight, bits, block, symmetric, out=weight.data)
                        spent.append(weight)
                    else:
                        saved.append((weight, weight.data))
                        weight.data = fake_quantize_nk(weight, bits, block, symmetric)
            yield
        finally:
            for weight, data in saved:
                weight.data = data
            if spent:
                weights.release(spent)

    return variant


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
