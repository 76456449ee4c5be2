"""Calibration data: which text, how many samples of how many tokens, and which seed.

Samples are windows of `length` consecutive tokens cut from the tokenized text at fixed
boundaries (0, length, 2*length, ...); `samples` of them are drawn without replacement with
numpy's generator seeded by `seed`. The same spec and tokenizer always give the same tokens.
"""

from __future__ import annotations

import re
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
# A tokenizer's memory grows with its longest pre-token (a run without whitespace: ~250 bytes per
# byte of it), and with the text of one call. Runs longer than this are cut into pieces of this
# length, and a call holds at most about _CHARS_PER_CALL characters, so 8 MB of NUL bytes costs
# what 8 MB of words does. No word of a real text comes near either bound: their tokens are
# those of the whole text.
_LONGEST_RUN = 4096
_CHARS_PER_CALL = 1 << 20
_LONG_RUN = re.compile(rf"\S{{{_LONGEST_RUN + 1}}}")
_SEGMENTS = re.compile(rf"\s+|\S{{1,{_LONGEST_RUN}}}")


def _pieces(text: str):
    """The text in the pieces it is tokenized in: 2000 lines at a time, unless that is too many
    characters or holds a run without whitespace too long to tokenize in bounded memory."""
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), _LINES_PER_CALL):
        group = "".join(lines[start : start + _LINES_PER_CALL])
        if len(group) <= _CHARS_PER_CALL and not _LONG_RUN.search(group):
            yield group
        else:
            yield from _bounded(group)


def _bounded(text: str):
    """`text` in pieces of about _CHARS_PER_CALL characters, cut before whitespace, and with
    every run longer than _LONGEST_RUN cut into pieces of its own."""
    piece: list[str] = []
    size = 0
    for match in _SEGMENTS.finditer(text):
        segment = match.group()
        if size >= _CHARS_PER_CALL and segment[0].isspace():
            yield "".join(piece)
            piece, size = [], 0
        piece.append(segment)
        size += len(segment)
        end = match.end()
        if len(segment) == _LONGEST_RUN and end < len(text) and not text[end].isspace():  # the run goes on
            yield "".join(piece)
            piece, size = [], 0
    if piece:
        yield "".join(piece)


def _token_chunks(tokenizer: Any, text: str):
    """The text's token ids, a piece at a time (newlines kept, no special tokens)."""
    for piece in _pieces(text):
        yield tokenizer(piece, add_special_tokens=False)["input_ids"]


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
