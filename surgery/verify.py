"""Verification: the exported model in onnxruntime against the edited PyTorch graph.

Protocol: a batch of two prompts of different lengths, left-padded, is prefilled; then
`steps` tokens are decoded through the KV cache (or by re-running the whole sequence for a
model exported without one). Both sides are fed the same tokens (PyTorch's greedy choice),
so their logits stay comparable at every step. Recorded: the max absolute logit difference
over all real (non-padding) positions, and whether the greedy tokens agree everywhere.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from surgery.models.graph import DecoderGraph, position_ids_from_mask
from surgery.runtime import OnnxCausalLM

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)


@dataclass(frozen=True)
class Verification:
    """The figures of one verification run."""

    passed: bool
    max_abs_logit_diff: float
    tolerance: float
    greedy_tokens_agree: bool
    greedy_tokens_compared: int
    greedy_tokens_mismatched: int
    prompts: tuple[str, ...]
    prompt_lengths: tuple[int, ...]
    decode_steps: int
    kv_cache: bool
    reason: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def _left_padded(tokenizer, prompts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in encoded], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded], dtype=torch.long)
    return ids, mask


def verify(
    graph: DecoderGraph,
    tokenizer,
    model_dir: str,
    steps: int,
    tolerance: float,
    threads: int | None = None,
    prompts: tuple[str, ...] = PROMPTS,
) -> Verification:
    """Run both models on the same inputs and compare; never raises on a mismatch."""
    started = time.perf_counter()
    onnx_model = OnnxCausalLM(model_dir, threads=threads, low_memory=True)
    ids, mask = _left_padded(tokenizer, prompts)
    positions = position_ids_from_mask(mask)
    real = mask.bool().numpy()
    prompt_lengths = tuple(int(n) for n in mask.sum(1))
    cache = graph.new_cache() if onnx_model.uses_cache else None

    reference = graph.forward(ids, mask, positions, cache)
    exported = onnx_model.step(ids.numpy(), mask.numpy(), positions.numpy())
    max_diff = float(np.abs(reference.numpy() - exported.logits)[real].max())
    compared = mismatched = 0
    all_ids = ids
    for _ in range(steps):
        expected = reference[:, -1].argmax(-1)
        got = torch.from_numpy(exported.logits[:, -1]).argmax(-1)
        compared += len(expected)
        mismatched += int((expected != got).sum())
        next_ids = expected[:, None]
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        if onnx_model.uses_cache:
            positions = positions[:, -1:] + 1
            reference = graph.forward(next_ids, mask, positions, cache)
            exported = onnx_model.step(next_ids.numpy(), mask.numpy(), positions.numpy(), exported.present)
            diff = np.abs(reference.numpy() - exported.logits).max()
        else:
            all_ids = torch.cat([all_ids, next_ids], dim=1)
            positions = position_ids_from_mask(mask)
            reference = graph.forward(all_ids, mask, positions, None)
            exported = onnx_model.step(all_ids.numpy(), mask.numpy(), positions.numpy())
            diff = np.abs(reference.numpy() - exported.logits)[mask.bool().numpy()].max()
        max_diff = max(max_diff, float(diff))
    finite = bool(np.isfinite(exported.logits).all())
    passed = finite and max_diff <= tolerance and mismatched == 0
    if not finite:
        reason = "ONNX Runtime produced non-finite logits"
    elif max_diff > tolerance:
        reason = f"max |logit diff| {max_diff:.3g} exceeds the tolerance {tolerance:g}"
    elif mismatched:
        reason = f"{mismatched} of {compared} greedy tokens differ"
    else:
        reason = "ok"
    return Verification(
        passed=passed,
        max_abs_logit_diff=max_diff,
        tolerance=tolerance,
        greedy_tokens_agree=mismatched == 0,
        greedy_tokens_compared=compared,
        greedy_tokens_mismatched=mismatched,
        prompts=prompts,
        prompt_lengths=prompt_lengths,
        decode_steps=steps,
        kv_cache=onnx_model.uses_cache,
        reason=reason,
        seconds=round(time.perf_counter() - started, 3),
    )
