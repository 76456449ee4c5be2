"""Verification: the exported model in onnxruntime against the edited PyTorch graph.

Protocol: a batch of two prompts of different lengths, left-padded, is prefilled; then
`steps` tokens are decoded through the KV cache (or by re-running the whole sequence for a
model exported without one). Both sides are fed the same tokens (PyTorch's greedy choice),
so their logits stay comparable at every step. Recorded: the max absolute logit difference
over all real (non-padding) positions, and whether the greedy tokens agree everywhere.

It runs in two phases so the PyTorch weights and the onnxruntime session never sit in
memory together: `trace_reference` records what PyTorch computes, the caller may then release
the PyTorch model, and `compare` replays the same inputs in onnxruntime.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from surgery.backend.evaluate import divergence, log_probs
from surgery.backend.runtime import OnnxCausalLM
from surgery.formats.precision import precision as precision_record
from surgery.ir.graph import DecoderGraph
from surgery.ir.inputs import position_ids_from_mask

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)


@dataclass(frozen=True)
class ReferenceTrace:
    """PyTorch's side of a verification run: inputs, its greedy tokens and its logits."""

    prompts: tuple[str, ...]
    input_ids: np.ndarray  # (batch, prompt length), left-padded
    attention_mask: np.ndarray
    tokens: np.ndarray  # (steps, batch): PyTorch's greedy token at each decode step
    prefill_logits: np.ndarray  # (batch, prompt length, vocab)
    step_logits: np.ndarray  # (steps, batch, vocab): logits of the last position after each token
    kv_cache: bool
    seconds: float
    # Dynamic layer fusion: PyTorch's chosen layer and every candidate's IKS, per position.
    fusion_layers: tuple[int, ...] = ()
    prefill_choice: np.ndarray | None = None  # (batch, prompt length)
    prefill_iks: np.ndarray | None = None  # (batch, prompt length, candidates)
    step_choice: np.ndarray | None = None  # (steps, batch)
    step_iks: np.ndarray | None = None  # (steps, batch, candidates)


# Dynamic fusion takes an argmin over candidates' IKS; where two candidates are within this
# of each other, onnxruntime and PyTorch may round to different winners, and both are right.
FUSION_TIE = 1e-5


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
    fusion_ties: int = 0  # positions where the two sides fused different, equally good layers
    precision: str = "fp32"  # the export's element type; PyTorch computed in the same one
    # Below fp32: the prefill logits against PyTorch in fp32 (mean KL(fp32 || output) in nats
    # and the share of positions whose top-1 token agrees), over every real prompt position.
    fp32_kl: float | None = None
    fp32_top1: float | None = None
    # How PyTorch's side ran: "greedy decode" (its own tokens, KV cache, the whole model loaded)
    # or "teacher-forced, layer by layer" (onnxruntime's tokens; surgery.backend.verify_layerwise).
    reference: str = "greedy decode"
    # The logits against PyTorch's (in the export's element type): mean KL(PyTorch || output) in
    # nats per position and top-1 agreement, over `positions`: the prompts' real positions and
    # every decode step's.
    # What a user reads first where logits are meant to move (quantization, half precision).
    mean_kl: float | None = None
    top1_agreement: float | None = None
    positions: int = 0
    # Whether the export's quantized linears were checked exactly: the float-compute twin against
    # PyTorch with the quantized weights (otherwise verification ran before quantization).
    quantized_weights: bool = False
    # A quantized KV cache: onnxruntime's codes against PyTorch's rounding (compared, differ,
    # not at a tie), with PyTorch attending over onnxruntime's codes (surgery.backend.verify_cache).
    kv_cache_codes: dict | None = None

    def to_json(self) -> dict:
        """Plain data for surgery.json."""
        return asdict(self)


def prompt_batch(tokenizer, prompts: tuple[str, ...], padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' ids, left-padded to one length; or, with `padded` False, cut to the shortest."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    if not padded:
        encoded = [row[: min(map(len, encoded))] for row in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in encoded], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded], dtype=torch.long)
    return ids, mask


def trace_reference(
    graph: DecoderGraph,
    tokenizer,
    kv_cache: bool,
    steps: int,
    prompts: tuple[str, ...] = PROMPTS,
    padded: bool = True,
) -> ReferenceTrace:
    """Prefill and greedy-decode `steps` tokens with the PyTorch graph, recording everything.

    `padded` False cuts the prompts to one length instead of left-padding them: the CUDA form
    of an export has no padding bias (see surgery/export/decoder.py).
    """
    started = time.perf_counter()
    ids, mask = prompt_batch(tokenizer, prompts, padded)
    positions = position_ids_from_mask(mask)
    cache = graph.new_cache() if kv_cache else None
    logits = graph.forward(ids, mask, positions, cache)
    prefill = logits.float().numpy()  # bf16 has no numpy type; compared in fp32
    prefill_choice = graph.last_choice
    choices = []
    tokens, step_logits = [], []
    all_ids, step_mask = ids, mask
    for _ in range(steps):
        next_ids = logits[:, -1].argmax(-1)[:, None]
        tokens.append(next_ids[:, 0].numpy())
        step_mask = torch.cat([step_mask, torch.ones_like(next_ids)], dim=1)
        if kv_cache:
            positions = positions[:, -1:] + 1
            logits = graph.forward(next_ids, step_mask, positions, cache)
        else:
            all_ids = torch.cat([all_ids, next_ids], dim=1)
            logits = graph.forward(all_ids, step_mask, position_ids_from_mask(step_mask), None)
        step_logits.append(logits[:, -1].float().numpy())
        if graph.last_choice is not None:
            choices.append((graph.last_choice.layer[:, -1].numpy(), graph.last_choice.iks[:, -1].numpy()))
    dynamic = {}
    if prefill_choice is not None:
        dynamic = {
            "fusion_layers": graph.fusion.layers,
            "prefill_choice": prefill_choice.layer.numpy(),
            "prefill_iks": prefill_choice.iks.numpy(),
            "step_choice": np.stack([c for c, _ in choices]) if choices else None,
            "step_iks": np.stack([s for _, s in choices]) if choices else None,
        }
    return ReferenceTrace(
        prompts=prompts,
        input_ids=ids.numpy(),
        attention_mask=mask.numpy(),
        tokens=np.stack(tokens) if tokens else np.zeros((0, len(prompts)), np.int64),
        prefill_logits=prefill,
        step_logits=np.stack(step_logits) if step_logits else np.zeros((0, len(prompts), prefill.shape[-1])),
        kv_cache=kv_cache,
        seconds=time.perf_counter() - started,
        **dynamic,
    )


def _fusion_ties(trace: ReferenceTrace, theirs: np.ndarray | None, ours: np.ndarray, scores: np.ndarray):
    """Positions where onnxruntime fused another layer than PyTorch: (ties, real disagreements).

    A tie is a choice whose IKS (by PyTorch) is within FUSION_TIE of PyTorch's minimum.
    """
    if theirs is None:
        return np.zeros(ours.shape, bool), np.zeros(ours.shape, bool)
    differ = theirs != ours
    index = {layer: i for i, layer in enumerate(trace.fusion_layers)}
    lookup = np.vectorize(lambda layer: index.get(int(layer), 0))
    their_iks = np.take_along_axis(scores, lookup(theirs)[..., None], axis=-1)[..., 0]
    our_iks = np.take_along_axis(scores, lookup(ours)[..., None], axis=-1)[..., 0]
    tie = differ & (np.abs(their_iks - our_iks) <= FUSION_TIE)
    return tie, differ & ~tie


def _kl_top1(reference: np.ndarray, logits: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """Mean KL(softmax(reference) || softmax(logits)) and top-1 agreement over the real positions."""
    kl, agree = divergence(log_probs(reference[real]), log_probs(logits[real]))
    return kl / int(real.sum()), agree / int(real.sum())


def _wrong_choices(reference: np.ndarray, chosen: np.ndarray, expected: np.ndarray, tolerance: float) -> int:
    """Rows where onnxruntime's greedy token is not PyTorch's and is worse by more than the tolerance.

    Two tokens whose reference logits lie within the tolerance are a tie the two sides may
    break differently (fp16 rounding does); a choice worse than that is a real disagreement.
    """
    rows = np.arange(len(expected))
    gap = reference[rows, expected] - reference[rows, chosen]
    return int(((chosen != expected) & (gap > tolerance)).sum())


def compare(
    trace: ReferenceTrace,
    model_dir: str,
    tolerance: float,
    threads: int | None = None,
    precision: str = "fp32",
    fp32: ReferenceTrace | None = None,
    providers: list[str] | None = None,
    recorded: OnnxRun | None = None,
) -> Verification:
    """Replay the trace's inputs in onnxruntime and compare; never raises on a mismatch.

    `trace` is PyTorch in the export's `precision`; `fp32`, given below fp32, is PyTorch in
    fp32 on the same prompts, for the KL divergence and top-1 agreement of the prefill.
    `recorded` is onnxruntime's run on exactly the trace's inputs, when one was kept (a
    teacher-forced trace is fed onnxruntime's own tokens): nothing is replayed then.
    """
    started = time.perf_counter()
    ids, mask = trace.input_ids, trace.attention_mask
    if recorded is None:
        # Unpacked weights stay memory-mapped from the data file: verification is short.
        model = OnnxCausalLM(model_dir, threads=threads, low_memory=True, providers=providers)
        steps = onnx_steps(model, ids, mask, lambda step, _: trace.tokens[step], len(trace.tokens))
        recorded = OnnxRun(steps, model.uses_cache)
    outputs = iter(recorded.outputs)
    out = next(outputs)
    real = mask.astype(bool)
    dynamic = trace.prefill_choice is not None
    ties = wrong = 0
    if dynamic:
        tie, bad = _fusion_ties(trace, out.fused_layer, trace.prefill_choice, trace.prefill_iks)
        real = real & ~tie
        ties, wrong = int((tie & mask.astype(bool)).sum()), int((bad & mask.astype(bool)).sum())
    reference = trace.prefill_logits.astype(np.float32)
    max_diff = float(np.abs(reference - out.logits)[real].max())
    finite = bool(np.isfinite(out.logits).all())
    fp32_kl = fp32_top1 = None
    if fp32 is not None:
        fp32_kl, fp32_top1 = _kl_top1(fp32.prefill_logits, out.logits, mask.astype(bool))
    # KL and top-1 over every compared position: the prefill's real ones, then each decode step's.
    kl_sum, agree = divergence(log_probs(reference[real]), log_probs(out.logits[real])) if real.any() else (0.0, 0)
    positions = int(real.sum())
    mismatched = 0
    previous = reference[:, -1]
    # A tie is judged at the precision's tolerance, also when the logits are only reported (inf).
    tie = min(tolerance, precision_record(precision).tolerance)
    for step, following in enumerate(outputs):
        # PyTorch's greedy choice is the argmax of its own logits: the token it fed itself, or,
        # for a teacher-forced trace, the token it would have chosen where onnxruntime chose.
        mismatched += _wrong_choices(previous, out.logits[:, -1].argmax(-1), previous.argmax(-1), tie)
        out = following
        finite &= bool(np.isfinite(out.logits).all())
        rows = np.ones(len(trace.tokens[step]), bool)
        if dynamic:
            theirs = out.fused_layer[:, -1] if out.fused_layer is not None else None
            tie, bad = _fusion_ties(trace, theirs, trace.step_choice[step], trace.step_iks[step])
            rows, ties, wrong = ~tie, ties + int(tie.sum()), wrong + int(bad.sum())
        previous = trace.step_logits[step].astype(np.float32)
        if rows.any():
            max_diff = max(max_diff, float(np.abs(previous - out.logits[:, -1])[rows].max()))
            step_kl, step_agree = divergence(log_probs(previous[rows]), log_probs(out.logits[:, -1][rows]))
            kl_sum, agree, positions = kl_sum + step_kl, agree + step_agree, positions + int(rows.sum())
    compared = int(trace.tokens.size)
    if not finite:
        reason = "ONNX Runtime produced non-finite logits"
    elif wrong:
        reason = f"the dynamically fused layer differs from PyTorch's at {wrong} position(s), not at a tie"
    elif dynamic and out.fused_layer is None:
        reason = "the exported model has no fused_layer output"
    elif recorded.uses_cache != trace.kv_cache:
        reason = "the exported model's KV-cache inputs do not match the export options"
    elif max_diff > tolerance:
        reason = f"max |logit diff| {max_diff:.3g} exceeds the tolerance {tolerance:g}"
    elif mismatched:
        reason = f"{mismatched} of {compared} greedy tokens differ"
    else:
        reason = "ok"
    return Verification(
        passed=reason == "ok",
        max_abs_logit_diff=max_diff,
        tolerance=tolerance,
        greedy_tokens_agree=mismatched == 0,
        greedy_tokens_compared=compared,
        greedy_tokens_mismatched=mismatched,
        prompts=trace.prompts,
        prompt_lengths=tuple(int(n) for n in trace.attention_mask.sum(1)),
        decode_steps=len(trace.tokens),
        kv_cache=recorded.uses_cache,
        reason=reason,
        seconds=round(trace.seconds + time.perf_counter() - started, 3),
        fusion_ties=ties,
        precision=precision,
        fp32_kl=fp32_kl,
        fp32_top1=fp32_top1,
        mean_kl=kl_sum / positions if positions else None,
        top1_agreement=agree / positions if positions else None,
        positions=positions,
    )


@dataclass(frozen=True)
class OnnxRun:
    """onnxruntime's outputs of a prefill and the decode steps after it, in order."""

    outputs: Iterable
    uses_cache: bool
    cache: list | None = None  # the KV cache after the last step (numpy), when it was kept


def onnx_steps(model: OnnxCausalLM, ids: np.ndarray, mask: np.ndarray, feed, steps: int):
    """The outputs of a prefill and then of `steps` decode steps, the token fed at step s being
    `feed(s, last output)` (batch,); through the KV cache, or by re-running the whole sequence
    for a model exported without one."""
    positions = position_ids_from_mask(torch.from_numpy(mask)).numpy()
    out = model.step(ids, mask, positions)
    yield out
    all_ids = ids
    for step in range(steps):
        next_ids = np.asarray(feed(step, out), np.int64)[:, None]
        mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
        if model.uses_cache:
            positions = positions[:, -1:] + 1
            out = model.step(next_ids, mask, positions, out.present)
        else:
            all_ids = np.concatenate([all_ids, next_ids], axis=1)
            positions = position_ids_from_mask(torch.from_numpy(mask)).numpy()
            out = model.step(all_ids, mask, positions)
        yield out


def verify(
    graph: DecoderGraph,
    tokenizer,
    model_dir: str,
    steps: int,
    tolerance: float,
    threads: int | None = None,
    kv_cache: bool = True,
) -> Verification:
    """Both phases in one call (for tests and callers that keep the PyTorch model anyway)."""
    return compare(trace_reference(graph, tokenizer, kv_cache, steps), model_dir, tolerance, threads)
