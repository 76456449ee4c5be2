"""The grouped form's rules, checked once for every statement that has one (`quantize <part> by
<source> { ... }` and `quantize kv-cache by <source> { ... }`): the first rule that matches a
layer decides; `rest` comes last; with `as many as fit`, the group is `most|least important -> W`
then `rest -> W'` and the first rule's amount is what the search finds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from surgery.front.budgets import check_fit
from surgery.front.selectors import ImportanceRank, RestLayers, unparse_source

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker
    from surgery.models.index import ModelIndex


def check_rules(c: Checker, statement: Any, part: str, index: ModelIndex, written: str,
                item_of: Callable[[Any], Any | None]) -> list:  # fmt: skip
    """Each rule of a grouped `statement` (with `rules`, `source`, `fit` and `span`) resolved:
    `item_of(rule)` makes its item (None where the rule's own options are wrong), which gets
    `rest`, an importance `query` ranking `part` by the group's source, or explicit `layers`.
    `written` is how the statement starts (`quantize layers`), for hints."""
    if not statement.rules:
        c.error("a grouped quantize needs at least one rule", statement.span, "e.g. `most important 25% -> int8`")
        return []
    fit = statement.fit
    if fit is not None and not _searched_shape(c, statement, index, written):
        return []
    resolved = []
    for position, rule in enumerate(statement.rules):
        if isinstance(rule.selector, RestLayers) and position != len(statement.rules) - 1:
            c.error("`rest` must be the last rule", rule.span,
                    "rules after `rest` can never match: every layer is taken by then")  # fmt: skip
            continue
        item = item_of(rule)
        if item is None:
            continue
        if isinstance(rule.selector, RestLayers):
            resolved.append(replace(item, rest=True))
        elif isinstance(rule.selector, ImportanceRank):
            selector = rule.selector
            if fit is not None and selector.count is None and selector.percent is None:
                selector = replace(selector, fit=fit)  # the amount the search fills in
            query = c.importance(selector, statement.source, part, index, rule.selector.span)
            if query is not None:
                resolved.append(replace(item, query=query))
        else:
            layers = c.selector(rule.selector, index)
            if layers is not None:
                resolved.append(replace(item, layers=layers))
    # The group's source must be valid even if no rule ranks by it.
    if not any(isinstance(rule.selector, ImportanceRank) for rule in statement.rules):
        c.score_source(statement.source, part, index)
    return resolved


def _searched_shape(c: Checker, statement: Any, index: ModelIndex, written: str) -> bool:
    """A searched group is `most|least important -> W` then `rest -> W'`, under `as many as fit`."""
    fit = statement.fit
    if not fit.marked:
        c.error("budgets in a grouped quantize need `as many as fit` before the block",
                fit.budgets[0].span if fit.budgets else statement.span,
                f"write `{written} {unparse_source(statement.source)} as many as fit {{ ... }}`")  # fmt: skip
        return False
    rules = statement.rules
    first = rules[0].selector if rules else None
    if not (len(rules) == 2 and isinstance(first, ImportanceRank) and first.count is None
            and first.percent is None and isinstance(rules[1].selector, RestLayers)):  # fmt: skip
        c.error("a searched grouped quantize has two rules: `most|least important -> <width>` and `rest -> <width>`",
                statement.span, "the search finds how many layers the first rule takes; e.g. `most important -> "
                "int8` and `rest -> int4`")  # fmt: skip
        return False
    check_fit(c, fit, index, more_is_lighter=rules[0].bits < rules[1].bits,
              what="the number of layers at the first rule's width")  # fmt: skip
    return True
