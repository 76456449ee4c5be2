"""Diagnostics that point at the recipe: `file:line:col: error: message`, the line, carets, a hint.

Every stage collects diagnostics instead of stopping at the first; the pipeline raises
:class:`RecipeError` once a stage has produced at least one error, carrying all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from surgery.source import Span

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Diagnostic:
    """One finding about a recipe. `span` may be None for problems that have no place in it.

    `quote` says whether the rendering may print the source line: False for spans into files
    that are not ours to show (a file named in a recipe that turned out not to be an importance
    file could hold anything, such as secrets), which render as a location only.
    """

    severity: Severity
    message: str
    span: Span | None = None
    hint: str | None = None
    quote: bool = True

    def to_json(self) -> dict[str, object]:
        """Plain data for `check --json`: severity, message, where (file, line, column), hint."""
        where = None
        if self.span is not None:
            where = {"file": self.span.source.name, "line": self.span.line, "column": self.span.column}
        return {"severity": self.severity, "message": self.message, "at": where, "hint": self.hint}

    def render(self) -> str:
        """rustc-style text: location, message, the source line with carets, then the hint."""
        # Messages quote recipe words and file names; neither may carry control characters.
        message, hint = printable(self.message), printable(self.hint) if self.hint else None
        if self.span is None or not self.quote:
            where = f"{printable(self.span.location())}: " if self.span is not None else ""
            return f"{where}{self.severity}: {message}" + (f"\n  = hint: {hint}" if hint else "")
        span = self.span
        line_no = span.line
        line_text, col = _clip(printable(span.source.line_text(line_no)), span.column)
        # Carets stop at the end of the first line of a multi-line span (and of the shown part).
        width = max(1, min(span.end - span.start, len(line_text) - col + 1))
        gutter = " " * len(str(line_no))
        out = [
            f"{printable(span.location())}: {self.severity}: {message}",
            f"{gutter} |",
            f"{line_no} | {line_text}",
            f"{gutter} | {' ' * (col - 1)}{'^' * width}",
        ]
        if hint:
            out.append(f"{gutter} = hint: {hint}")
        return "\n".join(out)


def printable(line: str) -> str:
    """A source line safe to print under carets: one visible character per character.

    Tabs become spaces and control or format characters (a vertical tab, U+2028, a stray escape
    sequence) become U+FFFD, so the terminal shows what the columns count and the carets line
    up; nothing in a recipe can move the cursor or clear the screen.
    """
    if line.isprintable():
        return line
    return "".join(" " if ch == "\t" else (ch if ch.isprintable() else "\ufffd") for ch in line)


_SHOWN = 160  # characters of a long line shown around the error


def _clip(line: str, column: int) -> tuple[str, int]:
    """At most about `_SHOWN` characters of `line` around `column`, and the column within them.

    A recipe of one very long line must not print that line once per error.
    """
    if len(line) <= _SHOWN:
        return line, column
    start = max(0, min(column - 1 - _SHOWN // 3, len(line) - _SHOWN))
    shown = line[start : start + _SHOWN]
    prefix = "\u2026" if start > 0 else ""
    suffix = "\u2026" if start + _SHOWN < len(line) else ""
    return prefix + shown + suffix, column - start + len(prefix)


class HintedError(Exception):
    """An error about an input (a model spec, a text) that carries a hint for its diagnostic."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def with_hint(self) -> str:
        """`message (hint)`, for places that print one line."""
        return str(self) + (f" ({self.hint})" if self.hint else "")


class RecipeError(Exception):
    """Raised with every error (and warning) a stage found; the CLI renders them and exits 1."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__(render_all(self.diagnostics))

    @property
    def errors(self) -> list[Diagnostic]:
        """The diagnostics of severity error."""
        return [d for d in self.diagnostics if d.severity == "error"]


def render_all(diagnostics: Iterable[Diagnostic]) -> str:
    """All diagnostics, blank-line separated, followed by a count line like a compiler's."""
    # In recipe order, like a compiler; diagnostics without a place come first, and those in
    # other files (an importance file) stay together in the order the files came up.
    diagnostics = list(diagnostics)
    files: dict[str, int] = {}
    for d in diagnostics:
        if d.span is not None:
            files.setdefault(d.span.source.name, len(files))
    diagnostics = sorted(
        diagnostics,
        key=lambda d: (d.span is not None, files[d.span.source.name] if d.span else 0, d.span.start if d.span else 0),
    )
    if not diagnostics:
        return ""
    errors = sum(d.severity == "error" for d in diagnostics)
    warnings = len(diagnostics) - errors
    parts = [d.render() for d in diagnostics]
    summary = []
    if errors:
        summary.append(f"{errors} error{'s' if errors != 1 else ''}")
    if warnings:
        summary.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
    return "\n\n".join(parts) + "\n\n" + ", ".join(summary) + " generated"


def raise_if_errors(diagnostics: Iterable[Diagnostic]) -> None:
    """Raise :class:`RecipeError` if any diagnostic is an error."""
    diagnostics = list(diagnostics)
    if any(d.severity == "error" for d in diagnostics):
        raise RecipeError(diagnostics)


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A `did you mean 'x'?` hint for a misspelt word, or None when nothing is close."""
    if len(word) > 64:  # no name is that long, and difflib is quadratic in the word's length
        return None
    return _closest(word, tuple(candidates))


@lru_cache(maxsize=4096)
def _closest(word: str, candidates: tuple[str, ...]) -> str | None:
    # Cached: a recipe repeating one misspelling thousands of times asks difflib once.
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None
