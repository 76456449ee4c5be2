"""`calibrate on "<text>" [samples N] [length L] [seed S]`: the data importance metrics and
expert statistics are computed on. Grammar: `calibrate_stmt`. The plan's `compute importance`
step (surgery/front/planner.py) carries it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery.calibration import DEFAULT_LENGTH, DEFAULT_SAMPLES, DEFAULT_SEED, CalibrationSpec
from surgery.front.plan_step import PlanStep
from surgery.front.selectors import (
    span_field,
)
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex


@dataclass(frozen=True)
class CalibrateStmt:
    """`calibrate on "<text>" [samples N] [length L] [seed S]`; omitted numbers take the defaults."""

    data: str
    samples: int | None = None
    length: int | None = None
    seed: int | None = None
    span: Span = span_field()
    data_span: Span = span_field()


NODES = (CalibrateStmt,)
GRAMMAR = ("calibrate_stmt",)

SYNTAX = """
calibrate_stmt: "calibrate" "on" STRING calibrate_option*
?calibrate_option: "samples" INT -> samples_option
                 | "length" INT  -> length_option
                 | "seed" INT    -> seed_option
"""

def _calibrate_stmt(ast, meta, children) -> CalibrateStmt:
    string, *options = children
    return CalibrateStmt(data=string[1:-1], span=ast.span(meta), data_span=ast.tok(string), **ast.options(options))


BUILDERS = {
    "calibrate_stmt": _calibrate_stmt,
    "samples_option": lambda ast, meta, children: {"samples": int(children[0])},
    "length_option": lambda ast, meta, children: {"length": int(children[0])},
    "seed_option": lambda ast, meta, children: {"seed": int(children[0])},
}


def unparse(statement: CalibrateStmt) -> str:
    """Canonical text."""
    text = f'calibrate on "{statement.data}"'
    for word in ("samples", "length", "seed"):
        if getattr(statement, word) is not None:
            text += f" {word} {getattr(statement, word)}"
    return text


def check(c: Checker, index: ModelIndex, done: dict) -> tuple[CalibrationSpec, Span | None]:
    """The calibration spec (defaults where the recipe says nothing) and its statement's span."""
    statements = c.single(CalibrateStmt, "calibrate")
    if not statements:
        return CalibrationSpec(), None
    statement = statements[0]
    c.text_exists(statement.data, statement.data_span)
    spec = CalibrationSpec(
        data=statement.data,
        samples=statement.samples if statement.samples is not None else DEFAULT_SAMPLES,
        length=statement.length if statement.length is not None else DEFAULT_LENGTH,
        seed=statement.seed if statement.seed is not None else DEFAULT_SEED,
    )
    if spec.samples < 1:
        c.error("calibration needs at least one sample", statement.span)
    if not 2 <= spec.length <= index.max_positions:
        c.error(
            f"calibration length {spec.length} is out of range",
            statement.span,
            f"use 2..{index.max_positions} tokens (the model's context)",
        )
    return spec, statement.span


def plan(state: PlanState) -> list[PlanStep]:
    """No step of its own: `compute importance` carries the calibration."""
    return []
