"""The typed recipe AST: frozen dataclasses, each carrying the span it was parsed from.

Spans are excluded from equality, so two recipes that say the same thing compare equal
wherever they were written (this is what the parse -> unparse -> parse round trip checks).
The selectors live in `surgery.front.selectors`; each statement's node lives with its statement in
`surgery/front/statements/` (one module per statement: node, check, plan step, description) and is
re-exported here. `unparse` prints the canonical text of a recipe.
"""

from __future__ import annotations

from typing import Protocol

from surgery.front.recipe import Recipe
from surgery.front.selectors import (
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
    Part,
    RestLayers,
    Selector,
    unparse_rank,
    unparse_selector,
    unparse_source,
)
from surgery.front.statements import for_node
from surgery.front.statements.calibrate import CalibrateStmt
from surgery.front.statements.drop import DropStmt
from surgery.front.statements.export import ExportStmt
from surgery.front.statements.fuse import FuseStmt
from surgery.front.statements.merge import MergeStmt
from surgery.front.statements.model import ModelStmt
from surgery.front.statements.prune import PruneStmt
from surgery.front.statements.quantize import QuantizeGroupStmt, QuantizePart, QuantizeRule, QuantizeStmt
from surgery.front.statements.split import SplitStmt
from surgery.front.statements.verify import VerifyStmt
from surgery.source import Span


class Statement(Protocol):
    """A statement's syntax node (each statement module's `NODES`): a frozen dataclass carrying
    the span it was parsed from. Which module owns a node is `surgery.front.statements.for_node`."""

    span: Span


def unparse_statement(statement: Statement) -> str:
    """Canonical text of one statement (its module's `unparse`)."""
    return for_node(statement).unparse(statement)


def unparse(recipe: Recipe) -> str:
    """Canonical recipe text: one statement per line, comments dropped."""
    return "".join(unparse_statement(s) + "\n" for s in recipe.statements)


__all__ = [
    "AllLayers", "CalibrateStmt", "DropStmt", "EvenlyLayers", "ExportStmt", "FirstLayers", "FuseStmt",
    "ImportanceRank", "ImportanceSelector", "ImportanceSource", "LastLayers", "LayerIndex", "LayerList",
    "LayerRange", "MergeStmt", "ModelStmt", "Part", "PruneStmt", "QuantizeGroupStmt", "QuantizePart",
    "QuantizeRule", "QuantizeStmt", "Recipe", "RestLayers", "Selector", "SplitStmt", "Statement", "VerifyStmt",
    "unparse", "unparse_rank", "unparse_selector", "unparse_source", "unparse_statement",
]  # fmt: skip
