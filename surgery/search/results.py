"""A search's results: the candidates measured, what each budget reads from them, the table
`surgery plan` prints and the content of search.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surgery.diagnostics import Diagnostic
from surgery.front.budgets import Budget
from surgery.search.candidates import SearchTarget

FIRST_RULE_LAYERS = "kv_first_rule_layers"  # a trade candidate's: layers at the first rule's cache width


@dataclass
class Candidate:
    """One measured count."""

    count: int
    layers: tuple[int, ...]
    measured: dict[str, Any]
    cached: bool
    verdicts: dict[str, bool] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        """Every budget holds."""
        return all(self.verdicts.values())


@dataclass
class SearchResult:
    """One statement's search: every candidate measured, and the answer."""

    target: SearchTarget
    method: str
    maximum: int
    candidates: list[Candidate]
    answer: Candidate | None
    seconds: float
    settled_text: str

    def built(self) -> int:
        """Candidates built in this run (not read from the cache)."""
        return sum(not c.cached for c in self.candidates)

    def to_json(self) -> dict[str, Any]:
        """search.json's entry for this statement."""
        fit = self.target.fit
        return {
            "line": self.target.line,
            "statement": self.target.statement.span.source.text[
                self.target.statement.span.start : self.target.statement.span.end
            ],
            "counting": self.target.counting(),
            "method": self.method,
            "rescore": fit.rescore,
            "budgets": [b.describe() for b in fit.budgets],
            "counts_possible": self.maximum + 1,
            "candidates_measured": len(self.candidates),
            "candidates_built": self.built(),
            "answer": None if self.answer is None else {"count": self.answer.count, "layers": list(self.answer.layers)},
            "settled_statement": self.settled_text,
            "seconds": round(self.seconds, 2),
            "candidates": [
                {
                    "count": c.count,
                    "layers": list(c.layers),
                    "fits": c.fits,
                    "verdicts": c.verdicts,
                    "cached": c.cached,
                    **c.measured,
                }  # fmt: skip
                for c in sorted(self.candidates, key=lambda c: c.count)
            ],
        }


def budget_value(budget: Budget, measured: dict[str, Any]) -> float:
    """The number a budget compares, as the search recorded it on the candidate (`values`)."""
    return measured["values"][budget.describe()]


def render_table(result: SearchResult) -> str:
    """The candidates as a text table, the answer marked."""
    budgets = result.target.fit.budgets
    trade = result.target.kind == "trade"  # the count is drops; a column says how many caches are wide
    wide = [f"{result.target.statement.rules[0].width} caches"] if trade else []
    header = ["count", "layers", *wide] + [b.column for b in budgets] + ["fits", ""]
    rows = []
    for c in sorted(result.candidates, key=lambda c: c.count):
        values = [b.render(budget_value(b, c.measured)) for b in budgets]
        shown_layers = ",".join(map(str, c.layers)) if c.layers else "-"
        if len(shown_layers) > 40:
            shown_layers = shown_layers[:37] + "..."
        mark = "<- answer" if result.answer is not None and c.count == result.answer.count else ""
        split = [str(c.measured[FIRST_RULE_LAYERS])] if trade else []
        rows.append([str(c.count), shown_layers, *split, *values, "yes" if c.fits else "no",
                     mark + (" (cached)" if c.cached else "")])  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]
    fit = result.target.fit
    summary = (
        f"search (line {result.target.line}, {result.method}{', rescored' if fit.rescore else ''}): "
        f"{result.target.counting()} = {result.answer.count if result.answer else 'none'}; "
        f"{len(result.candidates)} of {result.maximum + 1} counts measured, {result.built()} built, "
        f"{len(result.candidates) - result.built()} from the cache, {result.seconds:.1f} s"
    )
    return "\n".join([summary, *("  " + line for line in lines)])


def search_json(results: list[SearchResult], settled_text: str) -> dict[str, Any]:
    """The content of search.json."""
    return {
        "format": "surgery-search",
        "version": 1,
        "settled_recipe": settled_text,
        "searches": [r.to_json() for r in results],
        "notes": "counts are the original model's layers; perplexity increase is against the unmodified model in "
        "PyTorch (fp32) on the same tokens; latency by surgery/backend/latency.py's protocol on this machine",
    }


def unmet(target: SearchTarget, candidates: list[Candidate], maximum: int) -> Diagnostic:
    """No count meets every budget: the error names the candidate that came closest."""

    def shortfall(candidate: Candidate) -> tuple[int, float]:
        missed = [b for b in target.fit.budgets if not candidate.verdicts[b.describe()]]
        excess = 0.0
        for budget in missed:
            value = budget_value(budget, candidate.measured)
            limit = budget.shown_limit
            excess += abs(value - limit) / max(abs(limit), 1e-9)
        return len(missed), excess

    best = min(candidates, key=shortfall)
    missed = [
        f"{b.describe()} (measured {b.render(budget_value(b, best.measured))})"
        for b in target.fit.budgets
        if not best.verdicts[b.describe()]
    ]
    return Diagnostic(
        "error",
        f"no count meets every budget: the closest, {best.count} {target.counting()}, misses " + "; ".join(missed),
        target.fit.span,
        f"{len(candidates)} of {maximum + 1} counts measured (search.json with `apply` lists them); "
        "loosen a budget or change what the statement does",
    )
