"""`verify retrieval at <length>[, <length> ...] tokens [depths N] [max-loss P%]`: a pass key
hidden at N depths of a long filler text of each length (surgery/backend/retrieval.py) must be
found by the output in onnxruntime as often as by the original model in PyTorch, measured before
any pass, less at most P points per length (0 by default). A long-context check: perplexity on
512-token windows cannot see a surgery that loses what lies 16k tokens back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from surgery.diagnostics import Diagnostic, RecipeError
from surgery.front.plan_step import PlanStep, Run
from surgery.front.selectors import number_text, span_field
from surgery.progress import counted
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex

SYNTAX = """
// verify retrieval at <length>[, <length> ...] tokens [depths N] [max-loss P%]
verify_retrieval_stmt: "verify" "retrieval" "at" INT ("," INT)* "tokens" retrieval_option*
?retrieval_option: "depths" INT        -> depths_option
                 | "max-loss" PERCENT  -> max_loss_option
"""

DEFAULT_RETRIEVAL_DEPTHS = 5  # start, a quarter, the middle, three quarters, the end
MIN_LENGTH = 128  # shorter prompts hold too little filler for depths to mean anything
MAX_DEPTHS = 20


@dataclass(frozen=True)
class VerifyRetrievalStmt:
    """`verify retrieval at <lengths> tokens [depths N] [max-loss P%]`."""

    lengths: tuple[int, ...]
    depths: int = DEFAULT_RETRIEVAL_DEPTHS
    max_loss: float = 0.0  # percentage points of accuracy per length
    span: Span = span_field()


def _build(ast, meta, children) -> VerifyRetrievalStmt:
    lengths, options = ast.numbers_and_options(children)
    return VerifyRetrievalStmt(lengths, span=ast.span(meta), **options)


NODES = (VerifyRetrievalStmt,)
GRAMMAR = ("verify_retrieval_stmt",)
BUILDERS = {
    "verify_retrieval_stmt": _build,
    "depths_option": lambda ast, meta, children: {"depths": int(children[0])},
    "max_loss_option": lambda ast, meta, children: {"max_loss": float(children[0][:-1])},
}


def unparse(statement: VerifyRetrievalStmt) -> str:
    """Canonical text."""
    text = f"verify retrieval at {', '.join(map(str, statement.lengths))} tokens"
    if statement.depths != DEFAULT_RETRIEVAL_DEPTHS:
        text += f" depths {statement.depths}"
    if statement.max_loss:
        text += f" max-loss {number_text(statement.max_loss)}%"
    return text


def check(c: Checker, index: ModelIndex, done: dict) -> VerifyRetrievalStmt | None:
    """Lengths within the model's context, a sensible number of depths and bound, and an export
    with a KV cache (the prompt is prefilled through it a piece at a time)."""
    statements = c.single(VerifyRetrievalStmt, "retrieval check")
    if not statements:
        return None
    statement = statements[0]
    export, _ = done["export"]
    ok = True
    if not export.kv_cache:
        c.error("the retrieval check prefills its long prompts through the KV cache, and the export has none",
                statement.span, "drop `without kv-cache` from the export statement")  # fmt: skip
        ok = False
    for length in statement.lengths:
        if not MIN_LENGTH <= length <= index.max_positions:
            c.error(f"a retrieval prompt of {length} tokens is outside {MIN_LENGTH}..{index.max_positions}",
                    statement.span, f"the model's context is {index.max_positions} tokens")  # fmt: skip
            ok = False
    if not 1 <= statement.depths <= MAX_DEPTHS:
        c.error(f"{statement.depths} depths: use 1..{MAX_DEPTHS}", statement.span)
        ok = False
    if statement.max_loss >= 100:
        c.error("max-loss must be below 100%", statement.span, "at 100% the check could never fail")
        ok = False
    return statement if ok else None


def plan(state: PlanState) -> list[PlanStep]:
    """The retrieval step, when the recipe asks for one."""
    statement = state.checked.of("retrieval")
    if not statement:
        return []
    parameters = {"lengths": list(statement.lengths), "depths": statement.depths, "max_loss": statement.max_loss}
    return [RetrievalStep(action="verify retrieval", phase="evaluate", parameters=parameters, source=statement.span)]


@dataclass(frozen=True)
class RetrievalStep(PlanStep):
    """The `verify retrieval` step: its reference is measured before anything changes the model."""

    timing: ClassVar[str] = "retrieval"

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        lengths = ", ".join(f"{n:,}" for n in p["lengths"])
        loss = f"at most {number_text(p['max_loss'])} points fewer" if p["max_loss"] else "as many"
        return (f"pass-key retrieval at {lengths} tokens, {p['depths']} depth(s) each: the output in onnxruntime "
                f"finds {loss} per length as the original model in PyTorch")  # fmt: skip

    def _prompts(self, run: Run):
        from surgery.backend.retrieval import retrieval_prompts

        try:
            return retrieval_prompts(run.tokenizer, tuple(self.parameters["lengths"]), self.parameters["depths"])
        except ValueError as problem:  # this tokenizer spends more than the length on the question
            raise RecipeError([Diagnostic("error", str(problem), self.source, "ask for longer prompts")]) from problem

    def prepare(self, run: Run) -> None:
        """The original model's keys found, before any pass (PyTorch, a layer at a time)."""
        from surgery.backend.retrieval import found_by_graph, summary

        prompts = self._prompts(run)
        with counted(run.progress, f"pass-key retrieval of the original model ({len(prompts)} prompts, PyTorch, "
                     "layer by layer)", len(run.graph.layers), "layer"):  # fmt: skip
            found = found_by_graph(run.graph, prompts, run.settings.device)
        run.sections["retrieval"] = {"original_pytorch": summary(prompts, found)}
        run.clock.lap("retrieval_reference")

    def run(self, run: Run) -> None:
        """The output's keys found in onnxruntime on the run's provider, against the original's."""
        from surgery.backend.retrieval import found_by_output, summary
        from surgery.backend.runtime import OnnxCausalLM, execution_providers

        p, settings = self.parameters, run.settings
        prompts = self._prompts(run)
        model = OnnxCausalLM(str(run.folder.path), settings.threads, execution_providers(settings.provider))
        with counted(run.progress, f"pass-key retrieval of the output ({len(prompts)} prompts, onnxruntime "
                     f"{settings.provider})", len(prompts), "prompt"):  # fmt: skip
            output = summary(prompts, found_by_output(model, prompts))
        original = run.sections["retrieval"]["original_pytorch"]
        allowed = p["max_loss"] / 100
        lost = {length: original["lengths"][length]["accuracy"] - entry["accuracy"]
                for length, entry in output["lengths"].items()}  # fmt: skip
        run.sections["retrieval"] = {
            "protocol": f"pass key at {p['depths']} depth(s) of a filler text per length; found = the greedy answer "
            "starts with the key (teacher-forced argmax)",
            "original_pytorch": original,
            "output_onnxruntime": output,
            "lost": lost,
            "max_loss": allowed,
            "passed": all(loss <= allowed + 1e-9 for loss in lost.values()),
        }
