"""Perplexity of a model on a text, and how far an edited model's predictions moved.

Protocol (the same for every model, so numbers compare): the text is tokenized as one stream
(no special tokens) and cut to its first `max_tokens` tokens; the stream is split into
non-overlapping windows of `window` tokens (chunked, not sliding), each evaluated from an
empty context; every token but the first of a window is scored. Perplexity is exp of the mean
negative log-likelihood over scored tokens. `compare` scores two models on the same windows
and adds the mean KL divergence KL(reference || candidate) of the next-token distributions
and the top-1 agreement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from surgery.backend import long_context
from surgery.calibration import tokenize_text
from surgery.data import TextSource
from surgery.progress import advance

DEFAULT_WINDOW = 512
DEFAULT_MAX_TOKENS = 8192

# (1, T) token ids -> (T, vocab) float32 logits, from an empty context; or an iterator of them
# in consecutive pieces of `long_context.PIECE` positions (a long window, streamed).
LogitsFn = Callable[[np.ndarray], "np.ndarray | Iterator[np.ndarray]"]


@dataclass(frozen=True)
class EvalTokens:
    """The evaluated token stream and how it is windowed."""

    text: TextSource
    ids: np.ndarray
    window: int

    def windows(self) -> list[np.ndarray]:
        """Non-overlapping windows; a last window shorter than 2 tokens scores nothing and is left out."""
        chunks = [self.ids[i : i + self.window] for i in range(0, len(self.ids), self.window)]
        return [chunk for chunk in chunks if len(chunk) >= 2]

    def scored(self) -> int:
        """How many tokens get a score."""
        return sum(len(chunk) - 1 for chunk in self.windows())


def eval_tokens(tokenizer, text: TextSource, max_tokens: int = DEFAULT_MAX_TOKENS, window: int = DEFAULT_WINDOW):
    """The first `max_tokens` tokens of the text, to be scored in windows of `window`."""
    ids = tokenize_text(tokenizer, text.read())[:max_tokens]
    return EvalTokens(text, ids, window)


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of one model, with the protocol that produced it."""

    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    window: int
    seconds: float

    def to_json(self) -> dict[str, float | int]:
        """Plain data."""
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """A candidate against a reference on the same tokens."""

    candidate: Perplexity
    reference: Perplexity
    mean_kl: float  # KL(reference || candidate), nats per token
    top1_agreement: float

    def to_json(self) -> dict[str, object]:
        """Plain data."""
        return {
            "candidate": self.candidate.to_json(),
            "reference": self.reference.to_json(),
            "perplexity_increase": self.candidate.perplexity / self.reference.perplexity - 1,
            "mean_kl": self.mean_kl,
            "top1_agreement": self.top1_agreement,
        }


def log_probs(logits: np.ndarray) -> torch.Tensor:
    """Log-softmax over the last axis, in fp32."""
    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=-1)


def divergence(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, int]:
    """Over rows of log-probabilities: summed KL(reference || candidate), and the rows whose top-1 agrees."""
    kl = float((reference.exp() * (reference - candidate)).sum(dim=-1).double().sum())
    return kl, int((reference.argmax(-1) == candidate.argmax(-1)).sum())


def _pieces(result, timing: list[float]) -> Iterator[np.ndarray]:
    """A window's logits as consecutive pieces of `long_context.PIECE` positions: slices of a
    whole (T, vocab) array, or what a streamed model yields piece by piece (`streamed_prefill`);
    the seconds spent producing them are added to `timing[0]`."""
    if isinstance(result, np.ndarray):
        for start in range(0, len(result), long_context.PIECE):
            yield result[start : start + long_context.PIECE]
        return
    pieces = iter(result)
    while True:
        began = time.perf_counter()
        piece = next(pieces, None)
        timing[0] += time.perf_counter() - began
        if piece is None:
            return
        yield piece


def whole(result) -> np.ndarray:
    """A window's (T, vocab) logits, whether they came whole or in pieces."""
    return result if isinstance(result, np.ndarray) else np.concatenate(list(result))


class _Scores:
    """Summed NLL of each model and, between two, summed KL and top-1 agreement, window by window,
    a piece of `long_context.PIECE` positions at a time."""

    def __init__(self, tokens: EvalTokens):
        self.tokens, self.windows = tokens, tokens.windows()
        self.nll: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.kl_sum, self.agree = 0.0, 0

    def pieces(self, name: str, chunk: np.ndarray, logits: Callable[[], object]) -> Iterator[torch.Tensor]:
        """Score one window's logits (computed by `logits`, timed) under `name`, yielding each
        piece's log-probabilities at the positions that have a next token in the window."""
        timing = [0.0]
        began = time.perf_counter()
        result = logits()
        timing[0] += time.perf_counter() - began
        offset = 0
        for piece in _pieces(result, timing):
            targets = torch.from_numpy(chunk[offset + 1 : offset + 1 + len(piece)]).long()
            scored = log_probs(piece)[: len(targets)]
            self.nll[name] = self.nll.get(name, 0.0) + float(-scored.gather(1, targets[:, None]).double().sum())
            offset += len(piece)
            yield scored
        self.seconds[name] = self.seconds.get(name, 0.0) + timing[0]

    def add(self, name: str, chunk: np.ndarray, logits: Callable[[], object]) -> None:
        """Score one window under `name`."""
        for _ in self.pieces(name, chunk, logits):
            pass

    def add_both(self, chunk: np.ndarray, candidate: Callable[[], object], reference: Callable[[], object]) -> None:
        """Score one window under both names, and the divergence between them, piece by piece."""
        theirs = self.pieces("candidate", chunk, candidate)
        ours = self.pieces("reference", chunk, reference)
        for mine, other in zip(ours, theirs, strict=True):
            kl, agreeing = divergence(mine, other)
            self.kl_sum += kl
            self.agree += agreeing

    def perplexity(self, name: str) -> Perplexity:
        """The perplexity of the model scored under `name`."""
        scored = self.tokens.scored()
        mean = self.nll[name] / scored
        return Perplexity(math.exp(mean), mean, scored, len(self.windows), self.tokens.window, self.seconds[name])

    def comparison(self) -> Comparison:
        """The candidate against the reference."""
        scored = self.tokens.scored()
        return Comparison(self.perplexity("candidate"), self.perplexity("reference"), self.kl_sum / scored,
                          self.agree / scored)  # fmt: skip


def perplexity(model: LogitsFn, tokens: EvalTokens) -> Perplexity:
    """Chunked perplexity of one model."""
    scores = _Scores(tokens)
    for chunk in scores.windows:
        scores.add("model", chunk, lambda chunk=chunk: model(chunk[None]))
        advance("window")
    return scores.perplexity("model")


def compare(candidate: LogitsFn, reference: LogitsFn, tokens: EvalTokens) -> Comparison:
    """Perplexity of both, mean KL(reference || candidate), and top-1 agreement, window by window."""
    scores = _Scores(tokens)
    for chunk in scores.windows:
        scores.add_both(chunk, lambda chunk=chunk: candidate(chunk[None]), lambda chunk=chunk: reference(chunk[None]))
        advance("window")
    return scores.comparison()


def _graph_windows(
    graph, scores: _Scores, each: Callable[[np.ndarray, np.ndarray], None], device: str | None = None
) -> None:
    """Every window through a DecoderGraph layer-major (`forward_layerwise`: one layer loaded at a
    time), `each(window, logits)` called on one window's (T, vocab) fp32 logits at a time.

    `device` ("cuda"): sequential onloading, each layer moved there while every window goes
    through it; the windows' hidden states stay there, each window's logits come back to the CPU.
    """
    if scores.tokens.window > long_context.PIECE:  # long windows: a piece at a time
        start = time.perf_counter()
        long_context.graph_windows_streamed(graph, scores.windows, each, device)
        scores.seconds["reference"] = time.perf_counter() - start - scores.seconds.get("candidate", 0.0)
        return
    batches = []
    for chunk in scores.windows:
        ids = torch.from_numpy(chunk[None]).long()
        batches.append((ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None]))
    start = time.perf_counter()

    def reduce(i: int, logits: torch.Tensor) -> None:
        # Returns nothing: forward_layerwise keeps what this returns, and a window's log-probs
        # over a 128k vocabulary are 256 MB (16 windows held 4 GB).
        each(scores.windows[i], logits[0].float().cpu().numpy())

    graph.forward_layerwise(batches, reduce=reduce, device=device)
    # The layers' time is the reference's; what the callbacks timed themselves is added back below.
    scores.seconds["reference"] = time.perf_counter() - start - scores.seconds.get("candidate", 0.0)


def graph_perplexity(graph, tokens: EvalTokens, device: str | None = None) -> Perplexity:
    """`perplexity` of a DecoderGraph's PyTorch forward, computed layer-major: the model is never
    loaded whole, and the result is the window-by-window computation's. `device`: where the
    layers run, one at a time (`_graph_windows`)."""
    scores = _Scores(tokens)
    _graph_windows(graph, scores, lambda chunk, logits: scores.add("reference", chunk, lambda: logits), device)
    return scores.perplexity("reference")


def compare_with_graph(candidate: LogitsFn, graph, tokens: EvalTokens, device: str | None = None) -> Comparison:
    """`compare` against a DecoderGraph as the reference, layer-major: the candidate (onnxruntime)
    scores each window when PyTorch's logits for it come out of the head. `device`: where the
    reference's layers run, one at a time."""

    def each(chunk: np.ndarray, logits: np.ndarray) -> None:
        scores.add_both(chunk, lambda: candidate(chunk[None]), lambda: logits)
        advance("window")

    scores = _Scores(tokens)
    _graph_windows(graph, scores, each, device)
    return scores.comparison()


def onnx_logits(folder: str, threads: int | None = None, provider: str = "cpu", stream: bool = False) -> LogitsFn:
    """Logits of an output folder in onnxruntime (empty KV cache, one window at a time). With
    `stream`, a window longer than `long_context.PIECE` is prefilled a piece at a time through
    the output's KV cache and its logits come as an iterator of pieces."""
    from surgery.backend.runtime import OnnxCausalLM, execution_providers

    return session_logits(OnnxCausalLM(folder, threads=threads, providers=execution_providers(provider)), stream)


def session_logits(model, stream: bool = False) -> LogitsFn:
    """Logits of an open OnnxCausalLM, as `onnx_logits` gives them: a caller that also decodes or
    retrieves with the model holds one session (one copy of the weights), not two."""

    def run(ids: np.ndarray):
        if stream and model.uses_cache and ids.shape[1] > long_context.PIECE:
            return long_context.streamed_prefill(model, ids)
        mask = np.ones_like(ids)
        positions = np.arange(ids.shape[1])[None]
        return model.step(ids, mask, positions).logits[0]

    return run


def torch_logits(graph) -> LogitsFn:
    """Logits of a DecoderGraph in PyTorch (the reference forward)."""

    @torch.inference_mode()
    def run(ids: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(ids).long()
        mask = torch.ones_like(tensor)
        positions = torch.arange(tensor.shape[1])[None]
        return graph.forward(tensor, mask, positions)[0].float().numpy()

    return run
