"""Selectors and shared AST pieces: which of the original model's layers a statement targets.

Frozen dataclasses carrying the span they were parsed from; spans are excluded from equality.
Each statement's own node lives with the statement (surgery/front/statements/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from surgery.source import Span, number_text, span_field

if TYPE_CHECKING:
    from surgery.front.budgets import Fit

Part = Literal["attention", "mlp", "block"]


# Selectors: which of the original model's layers a statement targets.


@dataclass(frozen=True)
class LayerIndex:
    """One layer number as written; negative numbers count from the end."""

    value: int
    span: Span = span_field()


@dataclass(frozen=True)
class LayerRange:
    """`a..b`, inclusive at both ends."""

    start: LayerIndex
    end: LayerIndex
    span: Span = span_field()


@dataclass(frozen=True)
class LayerList:
    """`layers 3, 5, 9..12`."""

    items: tuple[LayerIndex | LayerRange, ...]
    span: Span = span_field()


@dataclass(frozen=True)
class AllLayers:
    """`layers *`."""

    span: Span = span_field()


@dataclass(frozen=True)
class FirstLayers:
    """`layers first N`."""

    count: int
    span: Span = span_field()


@dataclass(frozen=True)
class LastLayers:
    """`layers last N`."""

    count: int
    span: Span = span_field()


@dataclass(frozen=True)
class EvenlyLayers:
    """`layers evenly N`: N layers spread evenly over the depth, never the first or the last."""

    count: int
    span: Span = span_field()


@dataclass(frozen=True)
class ImportanceSource:
    """`by similarity` (computed from the calibration), `by "file.json"`, or `by lim in "file.json"`."""

    metric: str | None = None
    file: str | None = None
    span: Span = span_field()
    metric_span: Span | None = span_field()
    file_span: Span | None = span_field()


@dataclass(frozen=True)
class ImportanceRank:
    """`most|least important N` or `... P%`: how many layers, counted from which end.

    Neither count nor percent: the amount is searched for (`as many as fit`, `fit`; in a
    grouped quantize the group's block holds the budgets and the rule has no amount).
    """

    rank: Literal["most", "least"]
    count: int | None = None
    percent: float | None = None
    fit: Fit | None = None
    span: Span = span_field()


@dataclass(frozen=True)
class ImportanceSelector:
    """`most|least important N|P% by <source>`: layers ranked by importance scores."""

    rank: ImportanceRank
    source: ImportanceSource
    span: Span = span_field()


@dataclass(frozen=True)
class RestLayers:
    """`rest` in a grouped quantize: every layer no earlier rule matched."""

    span: Span = span_field()


Selector = LayerList | AllLayers | FirstLayers | LastLayers | EvenlyLayers | ImportanceSelector


def unparse_source(source: ImportanceSource) -> str:
    """Canonical text of `by ...`."""
    if source.file is None:
        return f"by {source.metric}"
    if source.metric is None:
        return f'by "{source.file}"'
    return f'by {source.metric} in "{source.file}"'


def unparse_rank(rank: ImportanceRank) -> str:
    """Canonical text of `most|least important N|P%` (no amount when it is searched for)."""
    if rank.count is None and rank.percent is None:
        return f"{rank.rank} important"
    amount = str(rank.count) if rank.count is not None else f"{number_text(rank.percent)}%"
    return f"{rank.rank} important {amount}"


def unparse_selector(selector: Selector) -> str:
    """Canonical text of a selector."""
    if isinstance(selector, ImportanceSelector):
        text = f"{unparse_rank(selector.rank)} {unparse_source(selector.source)}"
        return text + (f" {selector.rank.fit.unparse()}" if selector.rank.fit is not None else "")
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
