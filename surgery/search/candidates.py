"""Candidates: the recipe a searched statement becomes at one count, as plain recipe text.

A statement with `as many as fit` is searched on its own prefix: the statements that run
before it (in plan order: drops, then split, prune, merge, fuse, then quantize; recipe order
within each), with their own searches already settled, plus the recipe's `model`,
`calibrate` and `export` statements, and the statement itself at a concrete count. Later
statements and `verify` are not part of it. A candidate is recipe text, so it is built by the
same `apply` as any recipe, and its text (with the model) is its cache key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from surgery.front.budgets import Fit
from surgery.front.selectors import ImportanceSelector, LayerIndex, LayerList
from surgery.front.statements import STATEMENTS, for_node
from surgery.front.statements.kv_cache import QuantizeKVGroupStmt
from surgery.front.syntax import (
    CalibrateStmt,
    DropStmt,
    ExportStmt,
    ModelStmt,
    QuantizeGroupStmt,
    Recipe,
    Statement,
    VerifyStmt,
    unparse,
)


@dataclass(frozen=True)
class SearchTarget:
    """A statement whose amount is searched: where it is in the recipe and what its count means."""

    position: int  # index in recipe.statements
    statement: DropStmt | QuantizeGroupStmt | QuantizeKVGroupStmt
    fit: Fit

    @property
    def kind(self) -> str:
        """ "drop", "quantize" (of weights or of the KV cache: both search the first rule's count),
        or "trade" (a KV cache group with `or drop attention`: the count is attention layers
        dropped, the first rule's count follows from the kv-cache budget; surgery/search/trade.py)."""
        if isinstance(self.statement, DropStmt):
            return "drop"
        return "trade" if getattr(self.statement, "trade", None) is not None else "quantize"

    @property
    def more_is_lighter(self) -> bool:
        """Whether a larger count gives a smaller, faster model (see `budgets.improves_with_count`)."""
        if isinstance(self.statement, DropStmt):
            return True
        first, rest = self.statement.rules
        return first.bits < rest.bits

    @property
    def line(self) -> int:
        """The statement's first line in the recipe."""
        return self.statement.span.line

    def counting(self) -> str:
        """What the count is, for tables and messages."""
        if isinstance(self.statement, DropStmt):
            return {"attention": "attention layers", "mlp": "MLPs", "block": "layers"}[self.statement.part] + " dropped"
        first, _ = self.statement.rules
        if self.kind == "trade":
            return "attention layers dropped"
        if isinstance(self.statement, QuantizeKVGroupStmt):
            return f"layers with an {first.width} KV cache"
        return f"layers at int{first.bits}"


def search_targets(recipe: Recipe) -> list[SearchTarget]:
    """The statements with `as many as fit`, in the order their searches run (plan order)."""
    found = []
    for position, statement in enumerate(recipe.statements):
        if isinstance(statement, DropStmt) and isinstance(statement.selector, ImportanceSelector):
            if statement.selector.rank.fit is not None:
                found.append(SearchTarget(position, statement, statement.selector.rank.fit))
        elif isinstance(statement, QuantizeGroupStmt | QuantizeKVGroupStmt) and statement.fit is not None:
            found.append(SearchTarget(position, statement, statement.fit))
    return sorted(found, key=lambda target: (_plan_order(target.statement), target.position))


def _plan_order(statement: Statement) -> int:
    module = for_node(statement)
    return STATEMENTS.index(module) if module in STATEMENTS else -1


def concrete(target: SearchTarget, count: int, layers: tuple[int, ...] | None = None) -> Statement | None:
    """The statement at `count` (None: it does nothing at 0).

    Ranked by the static importance order the statement keeps its selector with the count
    filled in, so the plan shows the scores that chose the layers; `layers` (the re-scored
    order of `rescore`) writes them out instead.
    """
    statement = target.statement
    if isinstance(statement, DropStmt):
        if count == 0:
            return None
        if layers is not None:
            items = tuple(LayerIndex(layer) for layer in sorted(layers))
            return replace(statement, selector=LayerList(items=items))
        selector = statement.selector
        rank = replace(selector.rank, count=count, fit=None)
        return replace(statement, selector=replace(selector, rank=rank))
    first, rest = statement.rules
    rules = (rest,) if count == 0 else (replace(first, selector=replace(first.selector, count=count)), rest)
    return replace(statement, rules=rules, fit=None)


# What a searched statement becomes at a count: one statement, none (it does nothing at 0), or
# several (a trade: the attention drop and the KV cache group at their counts).
Settled = Statement | tuple[Statement, ...] | None


def _spliced(statement: Settled) -> list[Statement]:
    if statement is None:
        return []
    return list(statement) if isinstance(statement, tuple) else [statement]


def candidate_recipe(recipe: Recipe, target: SearchTarget, settled: dict[int, Settled], statement: Settled) -> Recipe:
    """The recipe a candidate builds: the settings, the target's prefix (searched statements as
    `settled`), and the target at its count (`statement`)."""
    order = _plan_order(target.statement)
    kept: list[Statement] = []
    for position, other in enumerate(recipe.statements):
        if position == target.position:
            kept += _spliced(statement)
            continue
        if isinstance(other, ModelStmt | CalibrateStmt | ExportStmt):
            kept.append(other)
            continue
        if isinstance(other, VerifyStmt):
            continue
        before = (_plan_order(other), position) < (order, target.position)
        if before:
            kept += _spliced(settled.get(position, other))
    return Recipe(tuple(kept), recipe.source)


def settled_recipe(recipe: Recipe, settled: dict[int, Settled]) -> Recipe:
    """The whole recipe with every searched statement replaced by its answer."""
    statements = []
    for position, statement in enumerate(recipe.statements):
        if position in settled:
            statements += _spliced(settled[position])
        else:
            statements.append(statement)
    return Recipe(tuple(statements), recipe.source)


def recipe_text(recipe: Recipe) -> str:
    """Canonical text of a candidate (its cache key, with the model)."""
    return unparse(recipe)
