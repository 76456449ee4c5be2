"""Recipe source text and spans into it (positions every later stage reports against)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """A recipe's text and the name it is reported under (a path, or `<string>`)."""

    name: str
    text: str

    def line_text(self, line: int) -> str:
        """The 1-based `line` of the text, without its newline."""
        lines = self.text.splitlines()
        return lines[line - 1] if 0 < line <= len(lines) else ""

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        line = self.text.count("\n", 0, offset) + 1
        line_start = self.text.rfind("\n", 0, offset) + 1
        return line, offset - line_start + 1

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
