"""Recipe source text and spans into it (positions every later stage reports against).

Lines end at `\n`, `\r\n` or `\r` and nowhere else (not at form feeds, vertical tabs, U+0085 or
U+2028, which Python's `str.splitlines` would also break at): `Source` normalizes the three
line endings to `\n` and drops a leading byte-order mark, so every offset, line and column
that any stage computes refers to the same text, the one diagnostics print.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property

_LINE_ENDING = re.compile(r"\r\n?")


def normalize_text(text: str) -> str:
    """The text with a leading BOM removed and `\\r\\n` and `\\r` turned into `\\n`."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return _LINE_ENDING.sub("\n", text) if "\r" in text else text


@dataclass(frozen=True)
class Source:
    """A recipe's (or a side file's) text and the name it is reported under (a path, or `<string>`).

    The text is normalized on construction (see the module docstring).
    """

    name: str
    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", normalize_text(self.text))

    @cached_property
    def _line_starts(self) -> list[int]:
        # Built once per source, so positions cost a binary search: a recipe with thousands of
        # errors renders in linear time.
        return [0, *(match.end() for match in re.finditer("\n", self.text))]

    @property
    def line_count(self) -> int:
        """How many lines the text has (a final line without a newline counts)."""
        starts = self._line_starts
        return len(starts) - (1 if starts[-1] == len(self.text) and len(starts) > 1 else 0)

    def line_text(self, line: int) -> str:
        """The 1-based `line` of the text, without its newline."""
        starts = self._line_starts
        if not 0 < line <= len(starts):
            return ""
        end = starts[line] - 1 if line < len(starts) else len(self.text)
        return self.text[starts[line - 1] : end]

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        line = bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def span(self, start: int, end: int) -> Span:
        """The span covering characters `start` (inclusive) to `end` (exclusive)."""
        return Span(self, start, max(end, start))


@dataclass(frozen=True)
class Span:
    """A half-open character range of a source; renders as `file:line:col`."""

    source: Source = field(repr=False)
    start: int
    end: int

    @property
    def line(self) -> int:
        """1-based line of the span's start."""
        return self.source.position(self.start)[0]

    @property
    def column(self) -> int:
        """1-based column of the span's start."""
        return self.source.position(self.start)[1]

    @property
    def text(self) -> str:
        """The source text the span covers."""
        return self.source.text[self.start : self.end]

    def location(self) -> str:
        """`file:line:col`, the prefix of every diagnostic."""
        return f"{self.source.name}:{self.line}:{self.column}"

    def to_json(self) -> dict[str, object]:
        """Plain data for plans and reports: where in the recipe, and the statement text."""
        return {
            "file": self.source.name,
            "line": self.line,
            "column": self.column,
            "text": self.source.line_text(self.line).strip(),
        }


def span_field() -> Span:
    """A dataclass field for a source span, left out of equality and repr."""
    return field(default=None, compare=False, repr=False)  # type: ignore[return-value]


def number_text(value: float) -> str:
    """A number as the recipe writes it (no trailing zeros)."""
    return f"{value:g}"
