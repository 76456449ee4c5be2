"""Budgets: `as many as fit { ... }`, the amount of a drop or a grouped quantize that is searched for.

A budget says what the exported model must keep (quality against the unmodified model on the
same tokens) or stay under (latency in onnxruntime on this machine, file size, average bits).
`drop attention least important by similarity as many as fit { perplexity on "wikitext-2-test"
max-increase 10% tokens 4096 }` asks for the largest count that keeps every budget; the search
(surgery/search/) builds candidates and measures them. This module holds the syntax nodes,
their canonical text, the checks against the model, and the one rule both the check and the
search use: which way each budget moves as the count grows.

Each budget kind owns its behaviour: its text (`describe`), its check (`check`), the
measurement it reads from a candidate (`key`, `read`), whether a value keeps it (`holds`), and
how tables show it (`column`, `render`, `shown_limit`); whether it is a resource (`resource`:
size, bits and latency shrink with a lighter model, quality does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from surgery.front.checked import DEFAULT_WINDOW, MIN_PERPLEXITY_TOKENS
from surgery.source import Span, number_text, span_field

if TYPE_CHECKING:
    from surgery.models.index import ModelIndex

QualityMeasure = Literal["perplexity", "kl", "top1"]
DEFAULT_BUDGET_TOKENS = 4096
DEFAULT_LATENCY_PROMPT = 256  # the benchmark protocol: ms per token after a 256-token prompt
SEARCH_METHODS = ("bisect", "exhaustive")


@dataclass(frozen=True)
class QualityRequest:
    """One text to score a candidate on, and whether KL / top-1 against the original are needed."""

    data: str
    tokens: int
    window: int
    compare: bool  # KL and top-1 need the original model's logits beside the candidate's


def quality_key(request: QualityRequest) -> str:
    """How a quality measurement is named in results: `<text> tokens N window W`."""
    return f"{request.data} tokens {request.tokens} window {request.window}"


@dataclass(frozen=True)
class QualityBudget:
    """`perplexity on "<text>" max-increase P%`, `kl on "<text>" at most X`, `top-1 on "<text>"
    at least P%`: the exported model against the unmodified one (PyTorch, fp32) on the same tokens."""

    measure: QualityMeasure
    data: str
    limit: float  # percent for perplexity and top-1; nats for KL
    tokens: int | None = None
    window: int | None = None
    span: Span = span_field()
    data_span: Span | None = span_field()

    def describe(self) -> str:
        """Canonical text."""
        head = {
            "perplexity": f'perplexity on "{self.data}" max-increase {number_text(self.limit)}%',
            "kl": f'kl on "{self.data}" at most {number_text(self.limit)}',
            "top1": f'top-1 on "{self.data}" at least {number_text(self.limit)}%',
        }[self.measure]
        head += f" tokens {self.tokens}" if self.tokens is not None else ""
        return head + (f" window {self.window}" if self.window is not None else "")

    resource: ClassVar[bool] = False

    def check(self, c, index: ModelIndex) -> None:
        """The limit is a sensible number; the tokens, the window and the text fit."""
        if self.measure == "perplexity" and self.limit <= 0:
            c.error("a perplexity budget needs a positive increase", self.span, "e.g. max-increase 10%")
        if self.measure == "top1" and not 0 < self.limit <= 100:
            c.error(f"{self.limit:g}% is not a share of tokens", self.span, "use a percentage in (0, 100]")
        if self.tokens is not None and self.tokens < MIN_PERPLEXITY_TOKENS:
            c.error(f"{self.tokens} tokens are too few to measure", self.span, f"use at least {MIN_PERPLEXITY_TOKENS}")
        if self.window is not None and not 2 <= self.window <= index.max_positions:
            c.error(
                f"a window of {self.window} tokens does not fit the model",
                self.span,
                f"use 2..{index.max_positions} (the model's context)",
            )
        c.text_exists(self.data, self.data_span or self.span)

    def request(self, compare: bool, max_positions: int = 1 << 30) -> QualityRequest:
        """The measurement this budget asks of a candidate (windows fit the model's context)."""
        window = self.window or min(DEFAULT_WINDOW, max_positions)
        return QualityRequest(self.data, self.tokens or DEFAULT_BUDGET_TOKENS, window, compare)

    def key(self, max_positions: int) -> str:
        """The name of the measurement this budget reads from a candidate's results."""
        return quality_key(self.request(False, max_positions))

    def read(self, measured: dict[str, Any], max_positions: int) -> float:
        """Increase (%), KL (nats) or top-1 (%) from a candidate's measurements."""
        quality = measured["quality"][self.key(max_positions)]
        if self.measure == "perplexity":
            return quality["increase"] * 100
        return quality["kl"] if self.measure == "kl" else quality["top1"] * 100

    def holds(self, value: float) -> bool:
        """Whether a value read by `read` keeps the budget."""
        return value >= self.limit if self.measure == "top1" else value <= self.limit

    def goodness(self, value: float) -> float:
        """A value read by `read` as a number that grows with quality (top-1 grows with it;
        perplexity increase and KL shrink), for choosing the best of several candidates."""
        return value if self.measure == "top1" else -value

    @property
    def shown_limit(self) -> float:
        """The limit in the unit `read` gives."""
        return self.limit

    @property
    def column(self) -> str:
        """The column's heading in the search table."""
        return {"perplexity": "ppl increase", "kl": "KL", "top1": "top-1"}[self.measure]

    def render(self, value: float) -> str:
        """A value as tables and messages show it."""
        if self.measure == "perplexity":
            return f"{value:+.2f}%"
        return f"{value:.4f}" if self.measure == "kl" else f"{value:.1f}%"


@dataclass(frozen=True)
class LatencyBudget:
    """`decode at most X ms per token` / `prefill at most X ms`, in onnxruntime on this machine."""

    measure: Literal["decode", "prefill"]
    ms: float
    prompt: int | None = None
    span: Span = span_field()

    def describe(self) -> str:
        """Canonical text."""
        unit = "ms per token" if self.measure == "decode" else "ms"
        text = f"{self.measure} at most {number_text(self.ms)} {unit}"
        return text + (f" prompt {self.prompt}" if self.prompt is not None else "")

    resource: ClassVar[bool] = True

    def check(self, c, index: ModelIndex) -> None:
        """A positive time; the prompt fits the model."""
        if self.ms <= 0:
            c.error("a latency budget needs a positive time", self.span, None)
        if self.prompt is not None and not 1 <= self.prompt < index.max_positions:
            c.error(
                f"a prompt of {self.prompt} tokens does not fit the model",
                self.span,
                f"use 1..{index.max_positions - 1}",
            )

    def key(self, max_positions: int) -> str:
        """The name of the measurement this budget reads from a candidate's results."""
        return f"{self.measure}_ms prompt {self.prompt or DEFAULT_LATENCY_PROMPT}"

    def read(self, measured: dict[str, Any], max_positions: int) -> float:
        """Milliseconds, from a candidate's measurements."""
        return measured["latency"][self.key(max_positions)]

    def holds(self, value: float) -> bool:
        """Whether a value read by `read` keeps the budget."""
        return value <= self.ms

    @property
    def shown_limit(self) -> float:
        """The limit in the unit `read` gives."""
        return self.ms

    @property
    def column(self) -> str:
        """The column's heading in the search table."""
        return f"{self.measure} ms"

    def render(self, value: float) -> str:
        """A value as tables and messages show it."""
        return f"{value:.2f} ms"


def size_in_bytes(limit: float, unit: str) -> float:
    """A size written as `<limit> MB|GB` in bytes (1 MB = 10^6 bytes, 1 GB = 10^9)."""
    return limit * (1e9 if unit == "GB" else 1e6)


@dataclass(frozen=True)
class SizeBudget:
    """`size at most X MB|GB` (the model's files) or `bits at most X` (average bits per weight)."""

    measure: Literal["size", "bits"]
    limit: float
    unit: str = ""  # "MB" or "GB" for size
    span: Span = span_field()

    @property
    def limit_bytes(self) -> float:
        """The size limit in bytes (1 MB = 10^6 bytes)."""
        return size_in_bytes(self.limit, self.unit)

    def describe(self) -> str:
        """Canonical text."""
        if self.measure == "bits":
            return f"bits at most {number_text(self.limit)}"
        return f"size at most {number_text(self.limit)} {self.unit}"

    resource: ClassVar[bool] = True

    def check(self, c, index: ModelIndex) -> None:
        """A positive limit."""
        if self.limit <= 0:
            c.error(f"a {self.measure} budget needs a positive limit", self.span, None)

    def key(self, max_positions: int) -> str:
        """The name of the measurement this budget reads from a candidate's results."""
        return self.measure

    def read(self, measured: dict[str, Any], max_positions: int) -> float:
        """MB (10^6 bytes) or average stored bits per weight, from a candidate's measurements."""
        return measured["bytes"] / 1e6 if self.measure == "size" else measured["bits"]

    def holds(self, value: float) -> bool:
        """Whether a value read by `read` keeps the budget."""
        return value <= self.shown_limit

    @property
    def shown_limit(self) -> float:
        """The limit in the unit `read` gives."""
        return self.limit_bytes / 1e6 if self.measure == "size" else self.limit

    @property
    def column(self) -> str:
        """The column's heading in the search table."""
        return "MB" if self.measure == "size" else "bits"

    def render(self, value: float) -> str:
        """A value as tables and messages show it."""
        return f"{value:.1f} MB" if self.measure == "size" else f"{value:.3f} bits"


@dataclass(frozen=True)
class KVCacheBudget:
    """`kv-cache at most X MB|GB at N tokens`: the KV cache of one sequence of N tokens, from the
    output's bytes per token (layers with attention, each in its cache format)."""

    limit: float
    unit: str
    tokens: int
    span: Span = span_field()

    measure: ClassVar[str] = "kv-cache"
    resource: ClassVar[bool] = True

    def describe(self) -> str:
        """Canonical text."""
        return f"kv-cache at most {number_text(self.limit)} {self.unit} at {self.tokens} tokens"

    def check(self, c, index: ModelIndex) -> None:
        """A positive limit; a length the model takes."""
        if self.limit <= 0:
            c.error("a kv-cache budget needs a positive limit", self.span, None)
        if not 1 <= self.tokens <= index.max_positions:
            c.error(f"{self.tokens} tokens do not fit the model", self.span,
                    f"use 1..{index.max_positions} (the model's context)")  # fmt: skip

    def key(self, max_positions: int) -> str:
        """The name of the measurement this budget reads from a candidate's results."""
        return "kv_bytes_per_token"

    def read(self, measured: dict[str, Any], max_positions: int) -> float:
        """MB (10^6 bytes) of cache at the budget's length."""
        return measured["kv_bytes_per_token"] * self.tokens / 1e6

    def holds(self, value: float) -> bool:
        """Whether a value read by `read` keeps the budget."""
        return value <= self.shown_limit

    @property
    def shown_limit(self) -> float:
        """The limit in MB."""
        return size_in_bytes(self.limit, self.unit) / 1e6

    @property
    def column(self) -> str:
        """The column's heading in the search table."""
        return f"KV MB@{self.tokens}"

    def render(self, value: float) -> str:
        """A value as tables and messages show it (three significant digits: caches span GB to kB)."""
        return f"{value:.3g} MB"


Budget = QualityBudget | LatencyBudget | SizeBudget | KVCacheBudget


@dataclass(frozen=True)
class Fit:
    """`as many as fit { budgets [search bisect|exhaustive] [rescore] }`."""

    budgets: tuple[Budget, ...]
    search: str = "bisect"
    rescore: bool = False
    marked: bool = True  # False: budgets in a grouped quantize that lacks `as many as fit`
    span: Span = span_field()

    def describe_items(self) -> list[str]:
        """The block's lines, canonical."""
        lines = [budget.describe() for budget in self.budgets]
        if self.search != "bisect":
            lines.append(f"search {self.search}")
        return lines + (["rescore"] if self.rescore else [])

    def unparse(self) -> str:
        """`as many as fit {\\n    ...\\n}`."""
        return "as many as fit {\n" + "".join(f"    {line}\n" for line in self.describe_items()) + "}"

    @property
    def quality(self) -> tuple[QualityBudget, ...]:
        """The quality budgets."""
        return tuple(b for b in self.budgets if isinstance(b, QualityBudget))

    @property
    def latency(self) -> tuple[LatencyBudget, ...]:
        """The latency budgets."""
        return tuple(b for b in self.budgets if isinstance(b, LatencyBudget))


def improves_with_count(budget: Budget, more_is_lighter: bool) -> bool:
    """Whether a budget gets easier to meet as the searched count grows.

    The count is what the statement takes: layers dropped, or layers given the first rule's
    width. When more means a lighter model (drops; a narrower first width), size, bits and
    latency improve with the count and quality worsens; otherwise the reverse. The search
    bisects on the budgets that worsen and checks the others at the answer; `check` uses the
    same rule to say which budgets can bound a search.
    """
    return budget.resource == more_is_lighter


def check_fit(c, fit: Fit, index: ModelIndex, more_is_lighter: bool, what: str) -> None:
    """Every budget's numbers, texts and units; a block that cannot bound the count is an error."""
    if not fit.budgets:
        c.error(
            "`as many as fit` needs at least one budget",
            fit.span,
            'e.g. `perplexity on "wikitext-2-test" max-increase 10%` or `size at most 150 MB`',
        )
        return
    kinds = [(b.measure, getattr(b, "data", None)) for b in fit.budgets]
    for position, budget in enumerate(fit.budgets):
        if kinds.index(kinds[position]) != position:
            c.error("this budget is given twice", budget.span, "keep one; every budget must hold")
        budget.check(c, index)
    if not any(not improves_with_count(b, more_is_lighter) for b in fit.budgets):
        bound = ("a quality budget (perplexity, kl, top-1)" if more_is_lighter
                 else "a size, bits, kv-cache or latency budget")  # fmt: skip
        c.warning(
            f"no budget here gets harder as {what} grows, so the search takes all of them",
            fit.span,
            f"add {bound} to bound the search",
        )
