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
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from surgery.calibration import tokenize_text
from surgery.data import TextSource

DEFAULT_WINDOW = 512
DEFAULT_MAX_TOKENS = 8192

# (1, T) token ids -> (T, vocab) float32 logits, from an empty context.
LogitsFn = Callable[[np.ndarray], np.ndarray]


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


def _nll(log_probs: torch.Tensor, chunk: np.ndarray) -> float:
    targets = torch.from_numpy(chunk[1:]).long()
    return float(-log_probs[:-1].gather(1, targets[:, None]).double().sum())


def perplexity(model: LogitsFn, tokens: EvalTokens) -> Perplexity:
    """Chunked perplexity of one model."""
    start = time.perf_counter()
    total = 0.0
    windows = tokens.windows()
    for chunk in windows:
        total += _nll(log_probs(model(chunk[None])), chunk)
    scored = tokens.scored()
    mean = total / scored
    return Perplexity(math.exp(mean), mean, scored, len(windows), tokens.window, time.perf_counter() - start)


def compare(candidate: LogitsFn, reference: LogitsFn, tokens: EvalTokens) -> Comparison:
    """Perplexity of both, mean KL(reference || candidate), and top-1 agreement, window by window."""
    nll = {"candidate": 0.0, "reference": 0.0}
    seconds = {"candidate": 0.0, "reference": 0.0}
    kl_sum, agree = 0.0, 0
    windows = tokens.windows()
    for chunk in windows:
        window: dict[str, torch.Tensor] = {}
        for name, model in (("candidate", candidate), ("reference", reference)):
            start = time.perf_counter()
            window[name] = log_probs(model(chunk[None]))
            seconds[name] += time.perf_counter() - start
            nll[name] += _nll(window[name], chunk)
        kl, agreeing = divergence(window["reference"][:-1], window["candidate"][:-1])
        kl_sum += kl
        agree += agreeing
    scored = tokens.scored()

    def result(name: str) -> Perplexity:
        mean = nll[name] / scored
        return Perplexity(math.exp(mean), mean, scored, len(windows), tokens.window, seconds[name])

    return Comparison(result("candidate"), result("reference"), kl_sum / scored, agree / scored)


def onnx_logits(folder: str, threads: int | None = None, provider: str = "cpu") -> LogitsFn:
    """Logits of an output folder in onnxruntime (empty KV cache, one window at a time)."""
    from surgery.runtime import OnnxCausalLM, execution_providers

    model = OnnxCausalLM(folder, threads=threads, providers=execution_providers(provider))

    def run(ids: np.ndarray) -> np.ndarray:
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
