"""`measure decode at <length>[, <length> ...] tokens [rounds N]`: the output's decode speed
after long contexts, in the report. At long context the KV cache, not the weights, sets what a
decode step reads, so a surgery that shrinks the cache (dropped attention, `quantize kv-cache`)
is judged by ms per token after 2k, 8k or 32k tokens, not after a 256-token prompt.

Each length is timed through a random cache of that many tokens in the output's own layout
(surgery/backend/latency.py `decode_after_cache`): a step's cost does not depend on the cache's
values, and a 32k prompt would take minutes to prefill on a CPU. A measurement, not a check:
it never fails the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from surgery.backend.latency import WARMUP_STEPS
from surgery.front.plan_step import PlanStep, Run
from surgery.front.selectors import span_field
from surgery.progress import advance, counted
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex

SYNTAX = """
// measure decode at <length>[, <length> ...] tokens [rounds N]
measure_decode_stmt: "measure" "decode" "at" INT ("," INT)* "tokens" decode_rounds?
decode_rounds: "rounds" INT
"""

DECODE_STEPS = 16  # timed steps per round at each length
DEFAULT_ROUNDS = 3
MAX_ROUNDS = 20


@dataclass(frozen=True)
class MeasureDecodeStmt:
    """`measure decode at <lengths> tokens [rounds N]`."""

    lengths: tuple[int, ...]
    rounds: int = DEFAULT_ROUNDS
    span: Span = span_field()


def _build(ast, meta, children) -> MeasureDecodeStmt:
    lengths, options = ast.numbers_and_options(children)
    return MeasureDecodeStmt(lengths, span=ast.span(meta), **options)


NODES = (MeasureDecodeStmt,)
GRAMMAR = ("measure_decode_stmt",)
BUILDERS = {
    "measure_decode_stmt": _build,
    "decode_rounds": lambda ast, meta, children: {"rounds": int(children[0])},
}


def unparse(statement: MeasureDecodeStmt) -> str:
    """Canonical text."""
    rounds = f" rounds {statement.rounds}" if statement.rounds != DEFAULT_ROUNDS else ""
    return f"measure decode at {', '.join(map(str, statement.lengths))} tokens{rounds}"


def check(c: Checker, index: ModelIndex, done: dict) -> MeasureDecodeStmt | None:
    """An export with a KV cache (the steps run through it), and lengths whose timed steps stay
    inside the model's context."""
    statements = c.single(MeasureDecodeStmt, "decode measurement")
    if not statements:
        return None
    statement = statements[0]
    export, _ = done["export"]
    ok = True
    if not export.kv_cache:
        c.error("decode is measured through the KV cache, and the export has none", statement.span,
                "drop `without kv-cache` from the export statement")  # fmt: skip
        ok = False
    longest = index.max_positions - WARMUP_STEPS - DECODE_STEPS
    for length in statement.lengths:
        if not 1 <= length <= longest:
            c.error(f"decode after {length} tokens does not fit the model's context of {index.max_positions}",
                    statement.span, f"use 1..{longest}: {WARMUP_STEPS + DECODE_STEPS} more tokens are decoded "
                    "after the cache")  # fmt: skip
            ok = False
    if not 1 <= statement.rounds <= MAX_ROUNDS:
        c.error(f"{statement.rounds} rounds: use 1..{MAX_ROUNDS}", statement.span)
        ok = False
    return statement if ok else None


def plan(state: PlanState) -> list[PlanStep]:
    """The measurement step, when the recipe asks for one."""
    statement = state.checked.of("decode")
    if not statement:
        return []
    parameters = {"lengths": list(statement.lengths), "rounds": statement.rounds, "steps": DECODE_STEPS}
    return [DecodeStep(action="measure decode", phase="evaluate", parameters=parameters, source=statement.span)]


@dataclass(frozen=True)
class DecodeStep(PlanStep):
    """The `measure decode` step: ms per token after each length, in the report's `decode`."""

    timing: ClassVar[str] = "decode"

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        lengths = ", ".join(f"{n:,}" for n in p["lengths"])
        return (f"decode ms per token after {lengths} tokens of cache (a random cache in the output's layout, "
                f"{p['steps']} greedy steps after {WARMUP_STEPS} warm-up, median of {p['rounds']} rounds)")

    def run(self, run: Run) -> None:
        """Time the output in onnxruntime on the run's provider."""
        import statistics

        import numpy as np

        from surgery.backend.latency import decode_after_cache
        from surgery.backend.runtime import OnnxCausalLM, execution_providers

        p, settings = self.parameters, run.settings
        model = OnnxCausalLM(str(run.folder.path), settings.threads, execution_providers(settings.provider))
        rng = np.random.default_rng(0)
        times: dict[int, list[float]] = {length: [] for length in p["lengths"]}
        lengths = ", ".join(f"{n:,}" for n in p["lengths"])
        with counted(run.progress, f"decode after {lengths} tokens (onnxruntime {settings.provider})",
                     p["rounds"] * len(times), "measurement"):  # fmt: skip
            for _ in range(p["rounds"]):
                for length in times:
                    times[length].append(decode_after_cache(model, length, p["steps"], rng))
                    advance("measurement")
        run.sections["decode"] = {
            "protocol": f"greedy one-token steps through a random cache of each length in the output's layout, "
            f"{p['steps']} timed after {WARMUP_STEPS} warm-up; the median step, median of {p['rounds']} rounds",
            "provider": settings.provider,
            "threads": settings.threads,
            "ms_per_token": {str(n): round(statistics.median(t), 3) for n, t in times.items()},
            "rounds_ms": {str(n): [round(v, 3) for v in t] for n, t in times.items()},
        }
