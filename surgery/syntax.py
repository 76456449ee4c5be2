"""The typed recipe AST: frozen dataclasses, each carrying the span it was parsed from.

Spans are excluded from equality, so two recipes that say the same thing compare equal
wherever they were written (this is what the parse -> unparse -> parse round trip checks).
`unparse` prints the canonical text of a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from surgery.source import Source, Span

Part = Literal["attention", "mlp", "block"]


def _span() -> Span:
    return field(default=None, compare=False, repr=False)  # type: ignore[return-value]


# Selectors: which of the original model's layers a statement targets.


@dataclass(frozen=True)
class LayerIndex:
    """One layer number as written; negative numbers count from the end."""

    value: int
    span: Span = _span()


@dataclass(frozen=True)
class LayerRange:
    """`a..b`, inclusive at both ends."""

    start: LayerIndex
    end: LayerIndex
    span: Span = _span()


@dataclass(frozen=True)
class LayerList:
    """`layers 3, 5, 9..12`."""

    items: tuple[LayerIndex | LayerRange, ...]
    span: Span = _span()


@dataclass(frozen=True)
class AllLayers:
    """`layers *`."""

    span: Span = _span()


@dataclass(frozen=True)
class FirstLayers:
    """`layers first N`."""

    count: int
    span: Span = _span()


@dataclass(frozen=True)
class LastLayers:
    """`layers last N`."""

    count: int
    span: Span = _span()


@dataclass(frozen=True)
class EvenlyLayers:
    """`layers evenly N`: N layers spread evenly over the depth, never the first or the last."""

    count: int
    span: Span = _span()


Selector = LayerList | AllLayers | FirstLayers | LastLayers | EvenlyLayers


# Statements.


@dataclass(frozen=True)
class ModelStmt:
    """`model "<spec>"`: which model the recipe operates on."""

    spec: str
    span: Span = _span()
    spec_span: Span = _span()


@dataclass(frozen=True)
class DropStmt:
    """`drop attention|mlp|block <selector>`."""

    part: Part
    selector: Selector
    span: Span = _span()


@dataclass(frozen=True)
class ExportStmt:
    """`export onnx [opset N] [without kv-cache]`."""

    format: str = "onnx"
    opset: int | None = None
    kv_cache: bool = True
    span: Span = _span()
    opset_span: Span | None = _span()


Statement = ModelStmt | DropStmt | ExportStmt


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its statements in source order."""

    statements: tuple[Statement, ...]
    source: Source | None = field(default=None, compare=False, repr=False)


def unparse_selector(selector: Selector) -> str:
    """Canonical text of a selector."""
    if isinstance(selector, AllLayers):
        return "layers *"
    if isinstance(selector, FirstLayers):
        return f"layers first {selector.count}"
    if isinstance(selector, LastLayers):
        return f"layers last {selector.count}"
    if isinstance(selector, EvenlyLayers):
        return f"layers evenly {selector.count}"
    items = []
    for item in selector.items:
        if isinstance(item, LayerRange):
            items.append(f"{item.start.value}..{item.end.value}")
        else:
            items.append(str(item.value))
    return "layers " + ", ".join(items)


def unparse_statement(statement: Statement) -> str:
    """Canonical text of one statement."""
    if isinstance(statement, ModelStmt):
        return f'model "{statement.spec}"'
    if isinstance(statement, DropStmt):
        return f"drop {statement.part} {unparse_selector(statement.selector)}"
    if isinstance(statement, ExportStmt):
        text = f"export {statement.format}"
        if statement.opset is not None:
            text += f" opset {statement.opset}"
        if not statement.kv_cache:
            text += " without kv-cache"
        return text
    raise TypeError(f"not a statement: {statement!r}")


def unparse(recipe: Recipe) -> str:
    """Canonical recipe text: one statement per line, comments dropped."""
    return "".join(unparse_statement(s) + "\n" for s in recipe.statements)
