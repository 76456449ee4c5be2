"""Selecting layers by importance: the query a selector becomes, and how it resolves.

`most important 25% by lim` is checked against the model's config (amount in range, metric
known and covering the part, file valid) and becomes an `ImportanceQuery`. It resolves once
scores exist: candidates are the layers that still have the part when the statement runs
(earlier drops remove layers from the running), ranked by importance, most important first,
ties to the lower layer number. A percentage of the candidates is rounded half up:
25% of 30 layers is 8 (7.5 -> 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from surgery.importance.metrics import MetricScores
from surgery.source import Span


@dataclass(frozen=True)
class ScoreSource:
    """Where scores come from: a metric computed from the calibration, or one in a file."""

    metric: str
    file: str | None = None  # resolved path; None = computed
    written: str | None = None  # the path as the recipe wrote it

    def describe(self) -> str:
        """`similarity` or `lim in "imp.json"`."""
        return self.metric if self.file is None else f'{self.metric} in "{self.written or self.file}"'


@dataclass(frozen=True)
class ImportanceQuery:
    """An importance selector, checked but not yet resolved to layers."""

    rank: str  # "most" | "least"
    count: int | None
    percent: float | None
    source: ScoreSource
    part: str  # which scores: "attention", "mlp" or "block"
    span: Span | None = None

    def describe(self) -> str:
        """`least important 8 by similarity (attention scores)`."""
        amount = str(self.count) if self.count is not None else f"{self.percent:g}%"
        return f"{self.rank} important {amount} by {self.source.describe()} ({self.part} scores)"

    def amount(self, candidates: int) -> int:
        """How many layers this query takes out of `candidates`."""
        if self.count is not None:
            return min(self.count, candidates)
        return min(candidates, math.floor(self.percent * candidates / 100 + 0.5))


def ranking(scores: MetricScores, part: str, candidates: list[int]) -> list[int]:
    """Candidates with a score, most important first (ties: lower layer number first)."""
    values = scores.scores[part]
    sign = 1.0 if scores.more_important == "higher" else -1.0
    scored = [layer for layer in candidates if not math.isnan(values[layer])]
    return sorted(scored, key=lambda layer: (-sign * values[layer], layer))


def resolve_query(query: ImportanceQuery, scores: MetricScores, candidates: list[int]) -> tuple[int, ...]:
    """The layers a query selects among `candidates`, sorted by layer number."""
    order = ranking(scores, query.part, candidates)
    n = query.amount(len(order))
    chosen = order[:n] if query.rank == "most" else order[len(order) - n :]
    return tuple(sorted(chosen))
