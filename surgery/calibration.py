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


def tokenize_text(tokenizer: Any, text: str) -> np.ndarray:
    """The whole text as one stream of token ids (no special tokens), tokenized line by line.

    Line-wise tokenization keeps a long file from becoming one huge tokenizer call; the
    newlines themselves are kept, so the stream is the text's tokens.
    """
    lines = text.splitlines(keepends=True)
    chunk = 2000
    ids: list[int] = []
    for start in range(0, len(lines), chunk):
        encoded = tokenizer("".join(lines[start : start + chunk]), add_special_tokens=False)["input_ids"]
        ids.extend(encoded)
    return np.asarray(ids, dtype=np.int64)


def calibration_tokens(tokenizer: Any, spec: CalibrationSpec, source: TextSource | None = None) -> np.ndarray:
    """(samples, length) token ids drawn as the module docstring says."""
    source = source or resolve_text(spec.data)
    stream = tokenize_text(tokenizer, source.read())
    windows = len(stream) // spec.length
    if windows < spec.samples:
        raise TextSourceError(
            f"'{spec.data}' has {len(stream)} tokens: {windows} windows of {spec.length}, "
            f"fewer than the {spec.samples} samples asked for",
            "ask for fewer samples or a shorter length, or give a longer text",
        )
    rng = np.random.default_rng(spec.seed)
    chosen = np.sort(rng.choice(windows, size=spec.samples, replace=False))
    return np.stack([stream[w * spec.length : (w + 1) * spec.length] for w in chosen])
