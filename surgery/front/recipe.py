"""A parsed recipe: its statements in source order (each a statement module's syntax node, see
`surgery.front.syntax.Statement`). Kept apart from the statement modules so that every stage can name
it without importing them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surgery.source import Source


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its statements in source order."""

    statements: tuple[Any, ...]
    source: Source | None = field(default=None, compare=False, repr=False)
