"""`verify perplexity on "<text>" max-increase P% [tokens N] [window W]`: after export, the
output's perplexity in onnxruntime against the original model's in PyTorch must stay within the
bound, on windows of W tokens (512 by default; up to the model's context, streamed a piece at a
time: surgery/backend/long_context.py). Grammar: `verify_stmt`. Its step runs
surgery/executor/perplexity.py."""

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
    window: int | None = None
    span: Span = span_field()
    data_span: Span = span_field()


NODES = (VerifyStmt,)
GRAMMAR = ("verify_stmt",)

SYNTAX = """
// verify perplexity on "<text>" max-increase P% [tokens N] [window W]
verify_stmt: "verify" "perplexity" "on" STRING "max-increase" PERCENT verify_option*
?verify_option: "tokens" INT -> tokens_option
              | "window" INT -> window_option
"""

def _verify_stmt(ast, meta, children) -> VerifyStmt:
    string, percent, *options = children
    return VerifyStmt(data=string[1:-1], max_increase=float(percent[:-1]), span=ast.span(meta),
                      data_span=ast.tok(string), **ast.options(options))  # fmt: skip


BUILDERS = {"verify_stmt": _verify_stmt}


def unparse(statement: VerifyStmt) -> str:
    """Canonical text."""
    text = f'verify perplexity on "{statement.data}" max-increase {number_text(statement.max_increase)}%'
    text += f" tokens {statement.tokens}" if statement.tokens is not None else ""
    return text + (f" window {statement.window}" if statement.window is not None else "")


def check(c: Checker, index: ModelIndex | None, done: dict) -> PerplexityCheck | None:
    """The perplexity bound, its text and token count checked; windows fit the model's context."""
    statements = c.single(VerifyStmt, "verify")
    if not statements:
        return None
    statement = statements[0]
    c.text_exists(statement.data, statement.data_span)
    longest = index.max_positions if index is not None else None
    window = statement.window if statement.window is not None else DEFAULT_WINDOW
    if statement.window is None and longest is not None:
        window = min(window, longest)
    if window < 2:
        c.error(f"a window of {window} tokens scores nothing", statement.span, "use a window of at least 2 tokens")
    elif longest is not None and window > longest:
        c.error(f"a window of {window} tokens is longer than the model's context of {longest}", statement.span,
                f"use `window {longest}` or less")  # fmt: skip
    # A long window needs its tokens: by default at least one window's worth.
    tokens = statement.tokens if statement.tokens is not None else max(DEFAULT_PERPLEXITY_TOKENS, window)
    if tokens < window:
        c.error(f"{tokens} tokens do not fill one window of {window}", statement.span,
                f"use `tokens {window}` or more, or a shorter window")  # fmt: skip
    if tokens < MIN_PERPLEXITY_TOKENS:
        c.error(
            f"{tokens} tokens is too few for a perplexity",
            statement.span,
            f"use at least {MIN_PERPLEXITY_TOKENS} tokens",
        )
    if statement.max_increase <= 0:
        c.error("max-increase must be above 0%", statement.span)
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
            parameters={"data": check.data, "max_increase": check.max_increase, "tokens": check.tokens,
                        "window": check.window},
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
            f'perplexity on "{p["data"]}" ({p["tokens"]} tokens, windows of {p.get("window", DEFAULT_WINDOW)}) in '
            f"onnxruntime vs the original model in PyTorch: at most +{p['max_increase']:g}%"
        )

    def prepare(self, run: Run) -> None:
        """The original model's perplexity, before any pass."""
        from surgery.executor.perplexity import reference_perplexity

        reference_perplexity(run)

    def run(self, run: Run) -> None:
        """The output's perplexity in onnxruntime against the reference."""
        from surgery.executor.perplexity import perplexity_check

        perplexity_check(run)
