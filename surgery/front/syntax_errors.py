"""Syntax errors as diagnostics: what was found, what was expected (in words), and the lexical
problems the grammar cannot express (a malformed layer list, an absurdly long number), each at
the exact character."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import lark
from lark import Token

from surgery.diagnostics import Diagnostic, did_you_mean
from surgery.grammar import lark_parser, statement_keywords
from surgery.source import Source

# How expected terminals read in an error message.
_TERMINAL_WORDS = {
    "INT": "a number",
    "SIGNED_INT": "a layer number",
    "LAYER_LIST": "layer numbers like 3, 5, 9..12",
    "STRING": 'a quoted string like "smollm2-135m"',
    "FORMAT": "onnx",
    "KV_CACHE": "'kv-cache'",
    "CUDA_GRAPHS": "'cuda-graphs'",
    "POSITION_IDS": "'position-ids'",
    "PERCENT": "a percentage like 25%",
    "METRIC_NAME": "a metric (similarity, lim, zd)",
    "WIDTH": "int4 or int8",
    "KV_WIDTH": "int8 or int4",
    "SUBLAYER": "attention or mlp",
    "NUMBER": "a number like 0.5",
    "GROUPING": "output or router",
    "SIZE_UNIT": "MB or GB",
    "SEARCH_METHOD": "bisect or exhaustive",
    "WEIGHTING": "frequency or uniform",
    "$END": "the end of the statement",
}


@lru_cache(maxsize=256)
def _describe_expected(names: frozenset[str]) -> list[str]:
    words = []
    for name in sorted(names):
        if name in _TERMINAL_WORDS:
            words.append(_TERMINAL_WORDS[name])
            continue
        try:
            pattern = lark_parser().get_terminal(name).pattern
        except KeyError:
            words.append(name.lower())
            continue
        if pattern.type == "str":
            words.append(f"'{pattern.value}'")
        elif re.fullmatch(r"\(\?:[a-z|-]+\)", pattern.value):  # an alternation of keywords
            words.extend(f"'{word}'" for word in pattern.value[3:-1].split("|"))
        else:
            words.append(name.lower())
    return sorted(set(words))


@lru_cache(maxsize=256)
def _keywords_in(names: frozenset[str]) -> list[str]:
    """Literal words a position accepts (expands PART and similar alternations)."""
    words = []
    for name in names:
        try:
            pattern = lark_parser().get_terminal(name).pattern
        except KeyError:
            continue
        if pattern.type == "str":
            words.append(pattern.value)
        else:
            words.extend(re.findall(r"[a-z][a-z-]*", pattern.value))
    return words


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*|[0-9]+(?:\.[0-9]+)?%?|\S")


def syntax_diagnostic(problem: SyntaxProblem, source: Source, chunk_start: int, chunk_end: int) -> Diagnostic:
    """Turn a syntax error into a diagnostic that says what was found and what was expected."""
    in_chunk = problem.position if problem.position is not None else chunk_end - chunk_start
    pos = min(chunk_start + in_chunk, chunk_end)
    if problem.at_end:
        span = source.span(max(chunk_end - 1, 0), chunk_end)
        hint = "expected " + _join(_describe_expected(problem.expected)) + " after this"
        if "as" in _keywords_in(problem.expected):  # `least important by M` with no amount
            hint = (
                "give the amount (`least important 8 by similarity`) or search for it: `... as many as fit { budgets }`"
            )
        return Diagnostic("error", "incomplete statement", span, hint=hint)
    match = _WORD.match(source.text, pos, chunk_end)
    found = match.group(0) if match else source.text[pos : pos + 1]
    span = source.span(pos, pos + max(len(found), 1))
    keywords = _keywords_in(problem.expected)
    shown = found if len(found) <= 40 else found[:40] + "\u2026"
    # Where a statement keyword is expected, a wrong word is an unknown statement keyword.
    if set(keywords) >= set(statement_keywords()) and found not in statement_keywords():
        return Diagnostic(
            "error",
            f"unknown keyword '{shown}'",
            span,
            hint=did_you_mean(found, statement_keywords())
            or "a statement starts with one of: " + ", ".join(statement_keywords()),
        )
    hint = did_you_mean(found, keywords) if found.isalpha() else None
    expected = _describe_expected(problem.expected)
    return Diagnostic(
        "error",
        f"unexpected '{shown}'" + (f", expected {_join(expected)}" if expected else ""),
        span,
        hint=hint,
    )


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


_LAYER_ITEM = re.compile(r"([+-]?[0-9]+)(?:[ \t]*\.\.[ \t]*([+-]?[0-9]+))?")


_BLANKS = re.compile(r"[ \t]*")


class LayerListError(Exception):
    """A malformed layer list: where (offset in the list's text), what was found, what was expected."""

    def __init__(self, position: int, found: str | None, expected: str):
        super().__init__(expected)
        self.position, self.found, self.expected = position, found, expected


@lru_cache(maxsize=4096)
def layer_items(text: str) -> tuple[re.Match, ...]:
    """The items of a LAYER_LIST token (`3, 5, 9..12`): one match per item, group 1 the layer
    (or a range's start), group 2 a range's end. Raises LayerListError at the first mistake."""
    end = len(text.rstrip())
    items = []
    position = 0
    while True:
        match = _LAYER_ITEM.match(text, position)
        if match is None:
            raise LayerListError(position, text[position] if position < end else None, "a layer number")
        items.append(match)
        position = _BLANKS.match(text, match.end()).end()
        if position >= end:
            return tuple(items)
        if text[position] == ",":
            position = _BLANKS.match(text, position + 1).end()
            continue
        if text.startswith("..", position):  # a range without its end, or `2...4`
            after = _BLANKS.match(text, position + 2).end()
            raise LayerListError(after, text[after] if after < end else None, "a layer number")
        raise LayerListError(position, text[position], "',', '..' or the end of the statement")


# Numbers are bounded where they are read: nothing a recipe counts (layers, samples, tokens,
# experts, an opset) comes near a billion, and Python refuses to convert integers of more than
# 4,300 digits, so a longer literal would otherwise crash the parser instead of being reported.
MAX_INTEGER_DIGITS = 9


MAX_NUMBER_LENGTH = 32


_NUMERIC_TERMINALS = {"INT", "SIGNED_INT", "NUMBER", "PERCENT"}


_LONG_NUMBER = re.compile(rf"[+-]?0*[1-9][0-9]{{{MAX_INTEGER_DIGITS},}}")


def lexical_diagnostics(tree: lark.Tree, source: Source, offset: int) -> list[Diagnostic]:
    """Errors the grammar cannot express: a malformed layer list (at the character where it goes
    wrong) and number literals beyond any sensible value, those inside layer lists included."""
    problems = []
    for token in tree.scan_values(lambda value: isinstance(value, Token)):
        start = offset + token.start_pos
        if token.type in _NUMERIC_TERMINALS:
            problem = _number_problem(str(token), source, start)
            if problem:
                problems.append(problem)
        elif token.type == "LAYER_LIST":
            try:
                layer_items(str(token))
            except LayerListError as error:
                problems.append(_layer_list_problem(error, source, start + error.position))
                continue
            for match in _LONG_NUMBER.finditer(token):
                problems.append(_number_problem(match.group(), source, start + match.start()))
    return problems


def _layer_list_problem(error: LayerListError, source: Source, at: int) -> Diagnostic:
    if error.found is None:
        hint = f"expected {error.expected} after this"
        return Diagnostic("error", "incomplete statement", source.span(at - 1, at), hint)
    return Diagnostic("error", f"unexpected '{error.found}', expected {error.expected}", source.span(at, at + 1))


def _number_problem(token: str, source: Source, start: int) -> Diagnostic | None:
    """An error for a number literal beyond any sensible value, or None."""
    if len(token) <= MAX_INTEGER_DIGITS:
        return None
    integer = token.lstrip("+-").rstrip("%").split(".")[0].lstrip("0")
    if len(integer) <= MAX_INTEGER_DIGITS and len(token) <= MAX_NUMBER_LENGTH:
        return None
    shown = token if len(token) <= 20 else token[:12] + f"\u2026 ({len(token)} characters)"
    return Diagnostic(
        "error",
        f"number {shown} is too large" if len(integer) > MAX_INTEGER_DIGITS else f"number {shown} is too long",
        source.span(start, start + len(token)),
        f"numbers in a recipe have at most {MAX_INTEGER_DIGITS} digits before the point "
        f"and {MAX_NUMBER_LENGTH} characters in all",
    )


@dataclass(frozen=True)
class SyntaxProblem:
    """What a diagnostic needs of lark's error (which would keep the parser's frames alive)."""

    position: int | None  # relative to the statement
    at_end: bool
    expected: frozenset[str]
