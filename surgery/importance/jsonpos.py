"""JSON with positions: parse a file into Python values plus the span of every field.

Validation errors in hand-written files (importance files) point at the exact field, rustc
style, so we need to know where each value sits; Python's json module does not say. This is
lark's JSON grammar with positions kept; values are decoded with the json module itself.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import lark

from surgery.source import Source, Span

_GRAMMAR = r"""
?value: object
      | array
      | STRING       -> string
      | NUMBER       -> number
      | "true"       -> true
      | "false"      -> false
      | "null"       -> null
array: "[" [value ("," value)*] "]"
object: "{" [pair ("," pair)*] "}"
pair: STRING ":" value
STRING: /"(?:[^"\\\x00-\x1f]|\\["\\\/bfnrtu])*"/
NUMBER: /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/ | "NaN" | "Infinity" | "-Infinity"
%import common.WS
%ignore WS
"""

Path = tuple[str | int, ...]


@cache
def _parser() -> lark.Lark:
    return lark.Lark(_GRAMMAR, start="value", parser="lalr", propagate_positions=True)


class JsonSyntaxError(Exception):
    """The text is not JSON; carries where."""

    def __init__(self, message: str, span: Span):
        super().__init__(message)
        self.span = span


MAX_DEPTH = 64  # an importance file nests 4 deep; anything far deeper is not one
_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep(text: str) -> int | None:
    """The offset where objects and lists nest deeper than MAX_DEPTH, if they do (strings skipped)."""
    depth = 0
    for match in _NESTING.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return match.start()
        elif token in "]}":
            depth -= 1
    return None


def _decode(token: str, source: Source, start: int) -> Any:
    try:
        return json.loads(token)
    except ValueError:  # an integer of thousands of digits, which Python refuses to convert
        raise JsonSyntaxError("number too long", source.span(start, start + 1)) from None


def parse_with_positions(source: Source) -> tuple[Any, dict[Path, Span]]:
    """The decoded value and, for every path (keys and list indices), the span of its value."""
    deep = _too_deep(source.text)
    if deep is not None:
        raise JsonSyntaxError(f"nested more than {MAX_DEPTH} levels deep", source.span(deep, deep + 1))
    try:
        tree = _parser().parse(source.text)
    except lark.exceptions.UnexpectedInput as error:
        pos = error.pos_in_stream if error.pos_in_stream is not None else len(source.text)
        pos = min(pos, max(len(source.text) - 1, 0))
        raise JsonSyntaxError("not valid JSON", source.span(pos, pos + 1)) from None
    spans: dict[Path, Span] = {}

    def walk(node, path: Path) -> Any:
        if isinstance(node, lark.Token):  # a bare value at the top
            return _decode(str(node), source, node.start_pos)
        spans[path] = source.span(node.meta.start_pos, node.meta.end_pos)
        kind = node.data
        if kind == "object":
            result = {}
            for pair in node.children:
                if pair is None:
                    continue
                key_token, value = pair.children
                key = _decode(str(key_token), source, key_token.start_pos)
                result[key] = walk(value, (*path, key))
            return result
        if kind == "array":
            return [walk(child, (*path, i)) for i, child in enumerate(c for c in node.children if c is not None)]
        if kind in ("string", "number"):
            return _decode(str(node.children[0]), source, node.meta.start_pos)
        return {"true": True, "false": False, "null": None}[kind]

    return walk(tree, ()), spans


def format_path(path: Path) -> str:
    """`metrics.lim.scores.block[3]`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the top level"
