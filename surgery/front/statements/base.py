"""What every statement module shares: the checker it reports to and the plan state it updates.

A statement module (surgery/front/statements/<name>.py) is the one home of a recipe statement:
- `NODES`: its syntax node class(es), frozen dataclasses with source spans;
- `SYNTAX`: its lark rules (the parser puts them with grammar/surgery.lark's shared ones);
- `GRAMMAR`: the rules its statements start from (offered by the grammar's `?statement`);
- `BUILDERS`: the AST builder of each of its rules, `(builder, meta, children) -> node`;
- `unparse(node)`: its canonical text;
- `check(checker, index, done)`: its check against the model index (config only), returning
  its resolved form (`done` holds the statements checked before it, by module name);
- `plan(state)`: its plan step(s), updating the state's kept layers;
- its step kinds (`PlanStep` subclasses): each describes itself, says what it needs, and runs
  itself under the executor (surgery/executor/);
- optionally `metrics(resolved)`: the computed importance metrics it ranks by (by default those
  of its resolved items' importance queries).
`surgery.front.check`, `surgery.front.planner` and `surgery.front.syntax.unparse` are loops over `STATEMENTS`;
adding a statement adds its module and one line to `STATEMENTS`; the parser and the grammar
collect its syntax from the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from surgery.diagnostics import Diagnostic
from surgery.front.plan_step import PlanStep

if TYPE_CHECKING:
    from surgery.front.checked import CheckedRecipe
    from surgery.front.selection import ImportanceQuery
    from surgery.importance.metrics import MetricScores

# Which importance scores rank the layers for a statement's part.
SCORE_PART = {"attention": "attention", "mlp": "mlp", "block": "block", "layers": "block"}


class Checker(Protocol):
    """The checker as statements see it (surgery.front.check._Checker): reporting and shared resolution."""

    recipe: Any
    diagnostics: list[Diagnostic]

    def error(self, message: str, span, hint: str | None = None) -> None:
        """Report an error at `span`."""

    def warning(self, message: str, span, hint: str | None = None) -> None:
        """Report a warning at `span`."""

    def single(self, kind: type, what: str) -> list:
        """The statements of `kind`; every one after the first is an error."""

    def check_recipe(self, recipe) -> Any:
        """Check another recipe (a draft's own) against the same model; raises RecipeError."""

    def selector(self, selector, index) -> tuple[int, ...] | None:
        """A layer selector resolved to original layer numbers (None, with errors, when it cannot be)."""

    def attention_selector(self, selector, index, what: str) -> tuple[int, ...] | None:
        """A layer selector for a statement about attention: an error where it selects a convolution layer."""

    def importance(self, rank, source, part: str, index, span):
        """An importance selector checked into a query the plan resolves (None with errors)."""

    def layer_number(self, item, n: int, hint: str) -> int | None:
        """One layer number in range (negative counts from the end)."""

    def text_exists(self, name: str, span) -> bool:
        """Whether a named text (built-in or file) exists; an error where it does not."""

    def score_source(self, source, part: str, index):
        """An importance source checked (metric or file) for `part`."""


@dataclass
class PlanState:
    """What the plan knows while statements add their steps: which layers keep which parts."""

    checked: CheckedRecipe
    select: Callable[[ImportanceQuery, list[int]], tuple[tuple[int, ...], dict]]
    computed_scores: Callable[[str], MetricScores]
    blocks: set[int]
    attention: set[int]
    mlp: set[int]
    warnings: list[Diagnostic]
    counted: str  # how expert statistics are counted (for the steps' notes)

    def __post_init__(self) -> None:
        self.steps: list[PlanStep] = []
