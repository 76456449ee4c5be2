"""Recipe text -> typed AST, with every syntax error of the recipe reported at once.

The recipe is first split into statements (one per line; a `{` opens a block that runs to its
matching `}`), and each statement is parsed on its own by the LALR grammar in
`grammar/surgery.lark`. A bad statement therefore cannot hide the errors of the next one.
The lark Transformer only builds AST nodes; meaning is checked later (surgery.front.check).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache, lru_cache

import lark
from lark import Token

from surgery.diagnostics import Diagnostic, RecipeError
from surgery.front.budgets import Fit, KVCacheBudget, LatencyBudget, QualityBudget, SizeBudget
from surgery.front.syntax import (
    AllLayers,
    EvenlyLayers,
    FirstLayers,
    ImportanceRank,
    ImportanceSelector,
    ImportanceSource,
    LastLayers,
    LayerIndex,
    LayerList,
    LayerRange,
    Recipe,
    Statement,
)
from surgery.front.syntax_errors import SyntaxProblem, layer_items, lexical_diagnostics, syntax_diagnostic
from surgery.grammar import lark_parser, statement_modules
from surgery.source import Source, Span


@cache
def _builders() -> dict:
    """The statement modules' AST builders by rule name."""
    return {rule: build for module in statement_modules() for rule, build in module.BUILDERS.items()}


def _strip_comment(line: str) -> str:
    """The line up to a `#` that is not inside a string."""
    in_string = False
    for i, ch in enumerate(line):
        if ch == '"':
            in_string = not in_string
        elif ch == "#" and not in_string:
            return line[:i]
    return line


def split_statements(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of each statement: a non-blank line, or a `{ ... }` block.

    `text` is a normalized Source text: lines end at `\n` only.
    """
    chunks: list[tuple[int, int]] = []
    offset = 0
    depth = 0
    chunk_start = -1
    for raw in text.split("\n"):
        code = _strip_comment(raw)
        if code.strip():
            if chunk_start < 0:
                chunk_start = offset + (len(code) - len(code.lstrip()))
            depth += code.count("{") - code.count("}")
            chunk_end = offset + len(code.rstrip())
            if depth <= 0:
                chunks.append((chunk_start, chunk_end))
                chunk_start, depth = -1, 0
        offset += len(raw) + 1
    if chunk_start >= 0:
        chunks.append((chunk_start, len(text.rstrip())))
    return chunks


@dataclass(frozen=True)
class _SearchOption:
    """`search bisect|exhaustive` or `rescore` inside a budget block (folded into its `Fit`)."""

    name: str
    value: object
    span: Span


def _with_meta(method):
    """Mark a rule method that also takes the node's position (lark's `meta`)."""
    method.takes_meta = True
    return method


class _ToAst:
    """Builds AST nodes from a statement's parse tree; attaches spans from lark's positions.

    A plain bottom-up walk rather than lark's Transformer, whose `v_args` wrappers are rebuilt
    on every call: a recipe of ten thousand statements is checked in a fraction of a second.
    """

    def __init__(self, source: Source, offset: int = 0):
        self.source = source
        self.offset = offset  # where the parsed statement starts in the source

    def transform(self, tree: lark.Tree):
        """The AST node (or intermediate value) for `tree`."""
        children = [self.transform(c) if isinstance(c, lark.Tree) else c for c in tree.children]
        method = getattr(type(self), tree.data, None)
        if method is None:
            build = _builders().get(tree.data)
            if build is not None:  # a statement module's builder: (this builder, meta, children)
                return build(self, tree.meta, children)
            return lark.Tree(tree.data, children, tree.meta)
        if getattr(method, "takes_meta", False):
            return method(self, tree.meta, children)
        return method(self, children)

    def span(self, meta) -> Span:
        """The source span of a parsed node (lark's `meta`)."""
        return self.source.span(self.offset + meta.start_pos, self.offset + meta.end_pos)


    def tok(self, token: Token) -> Span:
        """The source span of a token."""
        return self.source.span(self.offset + token.start_pos, self.offset + token.end_pos)

    @staticmethod
    def options(options) -> dict[str, object]:
        """Statement options (each built into a small dict) as keyword arguments."""
        fields: dict[str, object] = {}
        for option in options:
            fields.update(option)
        return fields

    @classmethod
    def numbers_and_options(cls, children) -> tuple[tuple[int, ...], dict[str, object]]:
        """A statement's list of whole numbers (`at 4096, 16384 tokens`) and its options."""
        numbers = tuple(int(child) for child in children if not isinstance(child, dict))
        return numbers, cls.options([child for child in children if isinstance(child, dict)])

    @staticmethod
    def fit(items: list, marker: Span | None, statement: Span) -> Fit:
        """A budget block from its items; its span runs from `as many as fit` (or the statement's
        start) to the statement's closing brace.

        Budgets without the marker (a grouped quantize with budgets but no `as many as fit`) keep
        `marked` False, which the check reports.
        """
        budgets = tuple(item for item in items if not isinstance(item, _SearchOption))
        options = {item.name: item.value for item in items if isinstance(item, _SearchOption)}
        start = marker or statement
        span = statement.source.span(start.start, statement.end)
        return Fit(budgets=budgets, search=str(options.get("search", "bisect")),
                   rescore=bool(options.get("rescore")), marked=marker is not None, span=span)  # fmt: skip

    @_with_meta
    def fit_rank(self, meta, children):
        return ImportanceRank(rank=str(children[0]), span=self.span(meta))

    @_with_meta
    def fit_marker(self, meta, children):
        return self.span(meta)

    # Budgets (surgery/front/budgets.py).

    def _quality_budget(self, kind: str, meta, children, percent: bool) -> QualityBudget:
        string, limit, *options = children
        value = float(limit[:-1] if percent else limit)
        return QualityBudget(kind, string[1:-1], value, span=self.span(meta), data_span=self.tok(string),
                             **self.options(options))  # fmt: skip

    @_with_meta
    def perplexity_budget(self, meta, children):
        return self._quality_budget("perplexity", meta, children, percent=True)

    @_with_meta
    def kl_budget(self, meta, children):
        return self._quality_budget("kl", meta, children, percent=False)

    @_with_meta
    def top1_budget(self, meta, children):
        return self._quality_budget("top1", meta, children, percent=True)

    @_with_meta
    def decode_budget(self, meta, children):
        number, *prompt = children
        return LatencyBudget("decode", float(number), prompt[0] if prompt else None, span=self.span(meta))

    @_with_meta
    def prefill_budget(self, meta, children):
        number, *prompt = children
        return LatencyBudget("prefill", float(number), prompt[0] if prompt else None, span=self.span(meta))

    def prompt_option(self, children):
        return int(children[0])

    def window_option(self, children):
        return {"window": int(children[0])}

    @_with_meta
    def size_budget(self, meta, children):
        number, unit = children
        return SizeBudget("size", float(number), str(unit), span=self.span(meta))

    @_with_meta
    def bits_budget(self, meta, children):
        return SizeBudget("bits", float(children[0]), span=self.span(meta))

    @_with_meta
    def kv_cache_budget(self, meta, children):
        number, unit, tokens = children
        return KVCacheBudget(float(number), str(unit), int(tokens), span=self.span(meta))

    @_with_meta
    def search_option(self, meta, children):
        return _SearchOption("search", str(children[0]), self.span(meta))

    @_with_meta
    def rescore_option(self, meta, children):
        return _SearchOption("rescore", True, self.span(meta))

    @_with_meta
    def selector(self, meta, children):
        (layer_set,) = children
        # The selector's span covers the `layers` keyword too.
        return replace(layer_set, span=self.span(meta))

    # Importance selectors.

    @_with_meta
    def importance_selector(self, meta, children):
        rank, source = children
        return ImportanceSelector(rank=rank, source=source, span=self.span(meta))

    @_with_meta
    def importance_rank(self, meta, children):
        rank, amount = children
        if amount.type == "PERCENT":
            return ImportanceRank(rank=str(rank), percent=float(amount[:-1]), span=self.span(meta))
        return ImportanceRank(rank=str(rank), count=int(amount), span=self.span(meta))

    def amount(self, children):
        return children[0]

    @_with_meta
    def metric_source(self, meta, children):
        (name,) = children
        return ImportanceSource(metric=str(name), span=self.span(meta), metric_span=self.tok(name))

    @_with_meta
    def file_source(self, meta, children):
        (string,) = children
        return ImportanceSource(file=string[1:-1], span=self.span(meta), file_span=self.tok(string))

    @_with_meta
    def metric_in_file_source(self, meta, children):
        name, string = children
        return ImportanceSource(
            metric=str(name),
            file=string[1:-1],
            span=self.span(meta),
            metric_span=self.tok(name),
            file_span=self.tok(string),
        )

    def tokens_option(self, children):
        return {"tokens": int(children[0])}

    @_with_meta
    def all_layers(self, meta, children):
        return AllLayers(span=self.span(meta))

    @_with_meta
    def first_layers(self, meta, children):
        return FirstLayers(count=int(children[0]), span=self.span(meta))

    @_with_meta
    def last_layers(self, meta, children):
        return LastLayers(count=int(children[0]), span=self.span(meta))

    @_with_meta
    def evenly_layers(self, meta, children):
        return EvenlyLayers(count=int(children[0]), span=self.span(meta))

    @_with_meta
    def layer_list(self, meta, children):
        (token,) = children
        base = self.offset + token.start_pos
        items: list[LayerIndex | LayerRange] = []
        for match in layer_items(str(token)):  # checked by `lexical_diagnostics`
            start = LayerIndex(int(match[1]), self.source.span(base + match.start(1), base + match.end(1)))
            if match[2] is None:
                items.append(start)
                continue
            end = LayerIndex(int(match[2]), self.source.span(base + match.start(2), base + match.end(2)))
            items.append(LayerRange(start, end, self.source.span(base + match.start(), base + match.end())))
        end = base + len(str(token).rstrip())
        return LayerList(items=tuple(items), span=self.source.span(base, end))

    @_with_meta
    def layer_index(self, meta, children):
        return LayerIndex(value=int(children[0]), span=self.span(meta))


@lru_cache(maxsize=4096)
def _parse_text(text: str) -> lark.Tree | SyntaxProblem:
    """The parse tree of one statement's text, or its syntax error (positions relative to it).

    Cached by text: trees are only read, and generated recipes repeat their lines.
    """
    try:
        return lark_parser().parse(text)
    except lark.exceptions.UnexpectedInput as error:
        at_end = isinstance(error, lark.exceptions.UnexpectedToken) and error.token.type == "$END"
        expected = getattr(error, "expected", None) or getattr(error, "allowed", None) or ()
        return SyntaxProblem(error.pos_in_stream, at_end, frozenset(expected))


def parse_statement(source: Source, start: int, end: int) -> Statement:
    """Parse the statement at `source.text[start:end]`; positions stay absolute in `source`.

    Raises RecipeError for a syntax error, a malformed layer list or a number out of bounds.
    """
    tree = _parse_text(source.text[start:end])
    if isinstance(tree, SyntaxProblem):
        raise RecipeError([syntax_diagnostic(tree, source, start, end)])
    problems = lexical_diagnostics(tree, source, start)
    if problems:
        raise RecipeError(problems)
    return _ToAst(source, start).transform(tree)


def parse_source(source: Source) -> Recipe:
    """Parse a whole recipe; raises RecipeError carrying every syntax error found."""
    statements: list[Statement] = []
    diagnostics: list[Diagnostic] = []
    for start, end in split_statements(source.text):
        try:
            statements.append(parse_statement(source, start, end))
        except RecipeError as error:
            diagnostics.extend(error.diagnostics)
    if diagnostics:
        raise RecipeError(diagnostics)
    return Recipe(statements=tuple(statements), source=source)


def parse(text: str, name: str = "<string>") -> Recipe:
    """Parse recipe text (see `parse_source`)."""
    return parse_source(Source(name, text))
