"""Latency in onnxruntime, by the benchmark protocol: batch 1, a prompt of real text, then
one-token greedy decode steps; 4 warm-up steps untimed; the median of a few rounds.

Budgets (`decode at most X ms per token`, `prefill at most X ms`) and benchmarks/common.py
measure with these functions, so a budget means what the benchmark tables mean.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

DECODE_STEPS = 32
WARMUP_STEPS = 4
ROUNDS = 3


def decode_once(model, prompt: np.ndarray, steps: int = DECODE_STEPS) -> float:
    """ms per token of `steps` one-token decode steps after prefilling `prompt` (batch 1). A
    prompt longer than a piece is prefilled a piece at a time (surgery.backend.long_context):
    a 32k prompt in one step would hold heads x 32k x 32k attention scores."""
    from surgery.backend.long_context import PIECE, prefill_in_pieces

    ids = prompt[None]
    if ids.shape[1] > PIECE and model.uses_cache:
        logits, past = prefill_in_pieces(model, ids)
        token = int(logits[-1].argmax())
    else:
        out = model.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
        token, past = int(out.logits[0, -1].argmax()), out.present
    length = ids.shape[1]
    start = 0.0
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        length += 1
        out = model.step(np.array([[token]]), np.ones((1, length), np.int64), np.array([[length - 1]]), past)
        token, past = int(out.logits[0, -1].argmax()), out.present
    return (time.perf_counter() - start) / steps * 1000


def decode_ms_per_token(model, prompt: np.ndarray, steps: int = DECODE_STEPS, rounds: int = ROUNDS) -> float:
    """Median over `rounds` of `decode_once`."""
    return statistics.median(decode_once(model, prompt, steps) for _ in range(rounds))


def prefill_ms(model, prompt: np.ndarray, rounds: int = ROUNDS) -> float:
    """Median ms of prefilling `prompt` (batch 1, empty cache), after one untimed run."""
    ids = prompt[None]
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1])[None]
    model.step(ids, mask, positions)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.step(ids, mask, positions)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def latency_prompt(length: int, folder: str) -> np.ndarray:
    """The first `length` tokens of the packaged WikiText-2 test text, in the folder's tokenizer."""
    from surgery.data import resolve_text
    from surgery.model_folder import open_model_folder

    tokenizer = open_model_folder(folder).tokenizer
    text = resolve_text("wikitext-2-test").read()
    ids = tokenizer(text[: length * 16])["input_ids"]
    if len(ids) < length:
        raise ValueError(f"the latency prompt needs {length} tokens; the text gives {len(ids)}")
    return np.asarray(ids[:length], dtype=np.int64)


def random_cache(model, length: int, rng: np.random.Generator) -> list:
    """A KV cache of `length` tokens in the model's own layout (an OnnxCausalLM's past inputs):
    float values, or int8 / packed int4 codes (uint8 bytes) where a layer is quantized; then the
    model's other states (LFM2's short convolutions) at zero."""
    past = []
    for (heads, size), kind in zip(model.kv_dims, model.kv_types, strict=True):
        shape = (1, heads, length, size)
        if kind == "tensor(int8)":
            past.append(rng.integers(-127, 128, shape, dtype=np.int8))
        elif kind == "tensor(uint8)":
            past.append(rng.integers(0, 256, shape, dtype=np.uint8))
        elif kind == "tensor(float)":
            past.append(rng.standard_normal(shape, dtype=np.float32) * 0.5)
        else:  # fp16 / bf16 caches: zeros of the element type cost a step the same
            past.append(_zeros_like_past(model, len(past), length))
    return past + model.empty_cache(1)[len(model.past_names) :]  # short-convolution states (LFM2): zeros


def _zeros_like_past(model, index: int, length: int):
    """Zeros of past input `index`'s element type (fp16 through numpy, bf16 as onnxruntime words)."""
    import onnxruntime as ort

    heads, size = model.kv_dims[index]
    kind = model.kv_types[index]
    if kind == "tensor(float16)":
        return np.zeros((1, heads, length, size), np.float16)
    words = np.zeros((1, heads, length, size), np.uint16)  # bfloat16 zeros
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(words, 16)


def decode_after_cache(model, length: int, steps: int = 16, rng: np.random.Generator | None = None) -> float:
    """Median ms of `steps` greedy one-token steps (after `WARMUP_STEPS` untimed) through a
    random cache of `length` tokens: a decode step's cost does not depend on the cache's values,
    so a long context is timed without prefilling it (a 32k prompt takes minutes on a CPU)."""
    rng = rng or np.random.default_rng(0)
    past = random_cache(model, length, rng)
    token, times = 1, []
    for i in range(WARMUP_STEPS + steps):
        position = length + i
        start = time.perf_counter()
        out = model.step(np.array([[token]]), np.ones((1, position + 1), np.int64), np.array([[position]]), past)
        token, past = int(out.logits[0, -1].argmax()), out.present
        if i >= WARMUP_STEPS:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
