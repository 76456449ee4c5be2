"""The joint search of `quantize kv-cache by <source> as many as fit { ...; or drop attention
least important; kv-cache at most X at N tokens; <quality> }`: how many attention layers to
drop and, in the layers that keep a cache, how many get the wider width.

A dropped attention layer has no cache, so every drop frees room under the kv-cache budget for
wider caches elsewhere. For each number of drops d the budget alone fixes the best split: the
most layers at the wider width whose bytes per token still fit (the budget's own `holds`, the
rule the measurement is judged by). That gives one point per d, from no drops (everything the
budget needs at the narrower width) to the first d where every kept layer has the wider width
(more drops after that only lose layers). Quality is not monotone along these points (a drop
costs quality, a wider cache wins some back), so every point is built and measured, and the
answer is the fitting point with the best value of the block's first quality budget (ties: the
fewer drops). The drops are the least important attention layers by the group's source, the
wider caches the most important of the rest: the same scores as the group's rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from surgery.diagnostics import Diagnostic, RecipeError
from surgery.formats.kv_cache import KVCacheFormat
from surgery.front.budgets import KVCacheBudget
from surgery.front.selectors import ImportanceRank, ImportanceSelector, RestLayers
from surgery.front.statements.drop import DropStmt
from surgery.front.statements.kv_cache import KVRule, QuantizeKVGroupStmt
from surgery.front.syntax import Statement, unparse_statement
from surgery.progress import counted
from surgery.search.candidates import SearchTarget
from surgery.search.results import FIRST_RULE_LAYERS, Candidate, SearchResult, budget_value, unmet


@dataclass(frozen=True)
class TradePoint:
    """One number of dropped attention layers, and the split of the rest the budget allows."""

    dropped: int
    first: int  # layers given the first rule's width
    kept: int  # layers that keep a cache
    bytes_per_token: int


def _format(rule: KVRule) -> KVCacheFormat:
    return KVCacheFormat.of(rule.bits, rule.granularity)


def frontier(statement: QuantizeKVGroupStmt, present: int, kv_heads: int, head_dim: int,
             max_positions: int) -> list[TradePoint]:  # fmt: skip
    """The points worth measuring (module docstring): for d = 0 .. present - 1 drops (or up to
    the `up to` of `or drop attention`), the split
    with the most layers at the wider width whose cache keeps every kv-cache budget; none for a
    d where even the narrower width everywhere does not fit; up to the first d where every kept
    layer has the wider width."""
    first_rule, rest_rule = statement.rules
    first, rest = (_format(rule).bytes_per_token(kv_heads, head_dim) for rule in (first_rule, rest_rule))
    budgets = [b for b in statement.fit.budgets if isinstance(b, KVCacheBudget)]

    def fits(total: int) -> bool:
        return all(b.holds(b.read({"kv_bytes_per_token": total}, max_positions)) for b in budgets)

    points = []
    most = statement.trade.most if statement.trade.most is not None else present - 1
    for dropped in range(min(most, present - 1) + 1):  # a decoder keeps at least one attention layer
        kept = present - dropped
        # Layers at the first rule's width, best first: most of them when it is the wider one.
        order = range(kept, -1, -1) if first >= rest else range(kept + 1)
        found = next((n for n in order if fits(n * first + (kept - n) * rest)), None)
        if found is None:
            continue
        points.append(TradePoint(dropped, found, kept, found * first + (kept - found) * rest))
        if found == (kept if first >= rest else 0):  # every kept layer at the wider width
            break
    return points


def trade_statements(statement: QuantizeKVGroupStmt, point: TradePoint) -> tuple[Statement, ...]:
    """The recipe lines a point stands for: the drop of the least important attention layers (on
    the `or drop attention` line) and the group with its first rule's count."""
    trade = statement.trade
    found: list[Statement] = []
    if point.dropped:
        rank = ImportanceRank("least", count=point.dropped, span=trade.span)
        selector = ImportanceSelector(rank, statement.source, span=trade.span)
        found.append(DropStmt("attention", selector, span=trade.span))
    first, rest = statement.rules
    if point.first == point.kept:  # every layer at the first width: one rule says it
        rules = (replace(first, selector=RestLayers(span=first.span)),)
    elif point.first == 0:
        rules = (rest,)
    else:
        rules = (replace(first, selector=replace(first.selector, count=point.first)), rest)
    found.append(replace(statement, rules=rules, fit=None, trade=None))
    return tuple(found)


def _dropped_layers(plan, statement: QuantizeKVGroupStmt) -> tuple[int, ...]:
    span = statement.trade.span
    return tuple(sorted(layer for step in plan.steps if step.action == "drop attention" and step.source is not None
                        and span.start <= step.source.start < span.end for layer in step.layers))  # fmt: skip


def _best(target: SearchTarget, candidates: list[Candidate]) -> Candidate | None:
    """The fitting candidate with the best first quality budget (ties: fewer drops)."""
    quality = target.fit.quality[0]
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return None
    return max(fitting, key=lambda c: (quality.goodness(budget_value(quality, c.measured)), -c.count))


def trade_search(searcher, recipe, target: SearchTarget, settled: dict) -> SearchResult:
    """The measured point with the best quality that keeps every budget (module docstring);
    `settled[target.position]` becomes its statements."""
    start = time.perf_counter()
    statement, fit, index = target.statement, target.fit, searcher.checked.index
    searcher.references(fit)
    _, base_plan = searcher.plan_of(recipe, target, settled, None)
    present = len(base_plan.kv_layers_after)
    points = {p.dropped: p for p in frontier(statement, present, index.num_kv_heads, index.head_dim,
                                             index.max_positions)}  # fmt: skip
    if not points:
        budget = next(b for b in fit.budgets if isinstance(b, KVCacheBudget))
        raise RecipeError([Diagnostic(
            "error", f"no number of dropped attention layers fits `{budget.describe()}`", budget.span,
            f"with the most drops allowed ({min(statement.trade.most or present, present - 1)} of {present} "
            "attention layers) and every cache at the narrower width it would still be over; raise the budget, "
            "shorten the context or allow more drops")])  # fmt: skip
    jobs, layers = {}, {}
    for dropped, point in points.items():
        candidate, plan = searcher.plan_of(recipe, target, settled, trade_statements(statement, point))
        jobs[dropped], layers[dropped] = searcher.job(fit, candidate), _dropped_layers(plan, statement)
    with counted(searcher.progress, f"search line {target.line}: attention dropped against cache widths, "
                 f"{len(points)} combinations", len(points), "candidate"):  # fmt: skip
        measured = searcher.measured_candidates(target, list(points), jobs, layers)
    candidates = [measured[d] for d in points]
    for candidate in candidates:
        candidate.measured[FIRST_RULE_LAYERS] = points[candidate.count].first
    answer = _best(target, candidates)
    if answer is None:
        raise RecipeError([unmet(target, candidates, max(points))])
    chosen = trade_statements(statement, points[answer.count])
    settled[target.position] = chosen
    return SearchResult(target, "every combination the budget allows", max(points), candidates, answer,
                        time.perf_counter() - start, "\n".join(unparse_statement(s) for s in chosen))  # fmt: skip
