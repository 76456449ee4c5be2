"""Calibration data: which text, how many samples of how many tokens, and which seed.

Samples are windows of `length` consecutive tokens cut from the tokenized text at fixed
boundaries (0, length, 2*length, ...); `samples` of them are drawn without replacement with
numpy's generator seeded by `seed`. The same spec and tokenizer always give the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from surgery.data import DEFAULT_CALIBRATION_TEXT, TextSource, TextSourceError, resolve_text

# About a minute for every data-driven metric on smollm2-135m on 2 CPU cores, import and load included.
DEFAULT_SAMPLES = 64
DEFAULT_LENGTH = 256
DEFAULT_SEED = 0


@dataclass(frozen=True)
class CalibrationSpec:
    """What a `calibrate on` statement (or the defaults) asks for."""

    data: str = DEFAULT_CALIBRATION_TEXT
    samples: int = DEFAULT_SAMPLES
    length: int = DEFAULT_LENGTH
    seed: int = DEFAULT_SEED

    def describe(self) -> str:
        """One line for the plan and progress messages."""
        return f'"{self.data}", {self.samples} samples x {self.length} tokens, seed {self.seed}'


_LINES_PER_CALL = 2000


def _token_chunks(tokenizer: Any, text: str):
    """The text's token ids, a chunk of lines at a time (newlines kept, no special tokens)."""
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), _LINES_PER_CALL):
        yield tokenizer("".join(lines[start : start + _LINES_PER_CALL]), add_special_tokens=False)["input_ids"]


def tokenize_text(tokenizer: Any, text: str) -> np.ndarray:
    """The whole text as one stream of token ids (no special tokens), tokenized line by line.

    Line-wise tokenization keeps a long file from becoming one huge tokenizer call; the
    newlines themselves are kept, so the stream is the text's tokens.
    """
    ids: list[int] = []
    for chunk in _token_chunks(tokenizer, text):
        ids.extend(chunk)
    return np.asarray(ids, dtype=np.int64)


def count_tokens(tokenizer: Any, text: str, enough: int) -> int:
    """How many tokens `tokenize_text` gives, counting only until `enough` (so checks stay fast)."""
    count = 0
    for chunk in _token_chunks(tokenizer, text):
        count += len(chunk)
        if count >= enough:
            break
    return count


def shortage(spec: CalibrationSpec, tokens: int) -> str | None:
    """Why `tokens` tokens cannot give the samples `spec` asks for, or None when they can.

    The one rule for both `check` (which counts with the tokenizer when it can load it without
    the weights, else bounds the count by the text's bytes) and the calibration itself.
    """
    windows = tokens // spec.length
    if windows >= spec.samples:
        return None
    return (
        f"'{spec.data}' has {tokens:,} tokens: {windows:,} windows of {spec.length}, "
        f"fewer than the {spec.samples:,} samples asked for"
    )


SHORTAGE_HINT = "ask for fewer samples or a shorter length, or give a longer text"


def calibration_tokens(tokenizer: Any, spec: CalibrationSpec, source: TextSource | None = None) -> np.ndarray:
    """(samples, length) token ids drawn as the module docstring says."""
    source = source or resolve_text(spec.data)
    stream = tokenize_text(tokenizer, source.read())
    problem = shortage(spec, len(stream))
    if problem:
        raise TextSourceError(problem, SHORTAGE_HINT)
    windows = len(stream) // spec.length
    rng = np.random.default_rng(spec.seed)
    chosen = np.sort(rng.choice(windows, size=spec.samples, replace=False))
    return np.stack([stream[w * spec.length : (w + 1) * spec.length] for w in chosen])
