"""`verify perplexity on "<text>" max-increase P% [tokens N]`: after export, the output's
perplexity in onnxruntime against the original model's in PyTorch must stay within the bound.
Grammar: `verify_stmt`. Its step runs surgery/executor/perplexity.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from surgery.front.checked import DEFAULT_PERPLEXITY_TOKENS, DEFAULT_WINDOW, MIN_PERPLEXITY_TOKENS, PerplexityCheck
from surgery.front.plan_step import PlanStep, Run
from surgery.front.selectors import (
    number_text,
    span_field,
)
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex




@dataclass(frozen=True)
class VerifyStmt:
    """`verify perplexity on "<text>" max-increase P% [tokens N]`."""

    data: str
    max_increase: float
    tokens: int | None = None
    span: Span = span_field()
    data_span: Span = span_field()


NODES = (VerifyStmt,)
GRAMMAR = ("verify_stmt",)

SYNTAX = """
// verify perplexity on "<text>" max-increase P% [tokens N]
verify_stmt: "verify" "perplexity" "on" STRING "max-increase" PERCENT verify_option*
?verify_option: "tokens" INT -> tokens_option
"""

def _verify_stmt(ast, meta, children) -> VerifyStmt:
    string, percent, *options = children
    return VerifyStmt(data=string[1:-1], max_increase=float(percent[:-1]), span=ast.span(meta),
                      data_span=ast.tok(string), **ast.options(options))  # fmt: skip


BUILDERS = {"verify_stmt": _verify_stmt}


def unparse(statement: VerifyStmt) -> str:
    """Canonical text."""
    text = f'verify perplexity on "{statement.data}" max-increase {number_text(statement.max_increase)}%'
    return text + (f" tokens {statement.tokens}" if statement.tokens is not None else "")


def check(c: Checker, index: ModelIndex | None, done: dict) -> PerplexityCheck | None:
    """The perplexity bound, its text and token count checked; windows fit the model's context."""
    statements = c.single(VerifyStmt, "verify")
    if not statements:
        return None
    statement = statements[0]
    c.text_exists(statement.data, statement.data_span)
    tokens = statement.tokens if statement.tokens is not None else DEFAULT_PERPLEXITY_TOKENS
    if tokens < MIN_PERPLEXITY_TOKENS:
        c.error(
            f"{tokens} tokens is too few for a perplexity",
            statement.span,
            f"use at least {MIN_PERPLEXITY_TOKENS} tokens",
        )
    if statement.max_increase <= 0:
        c.error("max-increase must be above 0%", statement.span)
    window = min(DEFAULT_WINDOW, index.max_positions) if index is not None else DEFAULT_WINDOW
    return PerplexityCheck(statement.data, statement.max_increase, tokens, statement.span, window)


def plan(state: PlanState) -> list[PlanStep]:
    """The `verify perplexity` step, when the recipe asks for one."""
    check = state.checked.perplexity
    if check is None:
        return []
    return [
        PerplexityStep(
            action="verify perplexity",
            phase="evaluate",
            parameters={"data": check.data, "max_increase": check.max_increase, "tokens": check.tokens},
            source=check.span,
        )
    ]


@dataclass(frozen=True)
class PerplexityStep(PlanStep):
    """The `verify perplexity` step: its reference is measured before anything changes the model."""

    timing: ClassVar[str] = "perplexity"

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        return (
            f'perplexity on "{p["data"]}" ({p["tokens"]} tokens) in onnxruntime vs the original model '
            f"in PyTorch: at most +{p['max_increase']:g}%"
        )

    def prepare(self, run: Run) -> None:
        """The original model's perplexity, before any pass."""
        from surgery.executor.perplexity import reference_perplexity

        reference_perplexity(run)

    def run(self, run: Run) -> None:
        """The output's perplexity in onnxruntime against the reference."""
        from surgery.executor.perplexity import perplexity_check

        perplexity_check(run)
