"""One run of a plan: what the steps read and what they leave for the report.

The steps share this state instead of passing it along a driver: the checked recipe, the model
(loaded lazily, its weights streamed a layer at a time unless the plan needs them all), the
calibration tokens, the output folder, where things run (device, provider, threads), and what
the report collects (pass records, sections, timings, the export and verification results).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.diagnostics import Diagnostic, RecipeError
from surgery.front.checked import CheckedRecipe

if TYPE_CHECKING:
    from surgery.front.plan import Plan
    from surgery.front.plan_step import PlanStep
    from surgery.importance.file import ImportanceFile

Progress = Callable[[str], None]


def quiet(message: str) -> None:
    """A progress callback that says nothing."""


class Clock:
    """The report's timings: each lap adds the time since the previous one to a name."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Add the time since the last lap to `name`."""
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> dict[str, float]:
        """The timings with the total since the clock started."""
        return {**self.timings, "total": time.perf_counter() - self.start}


@dataclass
class Settings:
    """Where and how a run works: the executor's policies that the user chooses."""

    verify: bool = True
    threads: int | None = None
    provider: str = "cpu"  # onnxruntime's provider for verification and the perplexity check
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    device: str | None = None  # PyTorch's device for calibration work and references (None: the CPU)


class Run:
    """The state one plan runs over (see the module docstring)."""

    def __init__(
        self,
        checked: CheckedRecipe,
        text: str,
        settings: Settings,
        progress: Progress = quiet,
        folder: Any = None,
        clock: Clock | None = None,
        scratch: Callable[[], Path] | None = None,
    ):
        self.checked, self.text, self.settings, self.progress = checked, text, settings, progress
        self.folder = folder  # the OutputFolder being written (None when only graph steps run)
        self.clock = clock or Clock()
        self._scratch = scratch or (folder.scratch if folder is not None else None)
        self.plan: Plan | None = None
        # The executor's policy, set from the plan: weights stream a layer at a time unless a
        # step needs the whole model.
        self.stream = True
        self.graph: Any = None
        self.model_tokenizer: Any = None  # a ModelTokenizer: `tokenizer` loads it on first use
        self.computed: ImportanceFile | None = None
        self.before: dict | None = None  # the unmodified model's structure
        self.after: dict | None = None  # the structure the export wrote
        self.passes: list[dict] = []
        self.sections: dict[str, Any] = {}
        self.export_result: Any = None
        self.options: Any = None  # the export options as written (quantized linears included)
        self.calibrated: dict = {}  # blocks by linear, where the rounding read the calibration data
        # Final format per quantized tensor: the plan's, with a `quantize model` preset's chosen
        # (set by the export step)
        self.quantization: dict = {}
        self.tied_head = False
        self.verification: Any = None
        self.moved: Any = None  # how far quantization moved the logits (informational)
        self.trace: Future | Any = None  # PyTorch's reference trace (whole-model verification)
        self.reference: Any = None  # (tokens, the original model's perplexity) for `verify perplexity`
        self.perplexity_passed: bool | None = None
        self.searches: tuple = ()
        # Applies another recipe (the draft's) into a folder, as this run was applied: set by
        # surgery.pipeline.apply (the executor sits below it).
        self.build: Callable[[Any, str], Any] | None = None
        self._calibration_tokens = None
        self._background: ThreadPoolExecutor | None = None

    # The model -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model lazily (its weights stay in the checkpoint until a layer needs them)."""
        from surgery.executor.loading import load_graph

        self.graph, self.model_tokenizer = load_graph(self.checked, self.progress)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use; a failure to load it is reported at the
        `model` line."""
        from surgery.models.specs import ModelSpecError

        if self.model_tokenizer is None:
            return None
        try:
            return self.model_tokenizer.get()
        except ModelSpecError as problem:
            raise RecipeError([Diagnostic("error", str(problem), self.checked.model_span, problem.hint)]) from problem

    def release_graph(self) -> None:
        """Drop the PyTorch weights (before onnxruntime maps the exported ones: the copies never add up)."""
        self.graph = None
        gc.collect()

    def scratch_folder(self) -> Callable[[], Path] | None:
        """The scratch folder, asked for only when a pass rewrites weights (None: in memory)."""
        return self._scratch if self.stream else None

    # Scores and calibration ----------------------------------------------------------------

    def scores(self) -> ImportanceFile:
        """The importance scores of the checked recipe's computed metrics: from the cache, else
        computed on the unmodified model, its layers run one at a time on the device."""
        if self.computed is None:
            from surgery.importance.compute import ScoreRequest, compute_importance

            checked = self.checked
            request = ScoreRequest(checked.metrics_to_compute(), checked.calibration, data_dir=checked.base_dir)
            if self.graph is None:
                self.load()
            with self.calibration_text():
                self.computed = compute_importance(self.graph, self.tokenizer, checked.spec, request, self.progress,
                                                   device=self.settings.device)  # fmt: skip
        return self.computed

    def calibration_tokens(self):
        """The recipe's calibration tokens, (samples, length), tokenized on first use."""
        if self._calibration_tokens is None:
            from surgery.calibration import calibration_tokens
            from surgery.data import resolve_text

            with self.calibration_text():
                text = resolve_text(self.checked.calibration.data, self.checked.base_dir)
                self._calibration_tokens = calibration_tokens(self.tokenizer, self.checked.calibration, text)
        return self._calibration_tokens

    def calibration_text(self):
        """A calibration text found too short once tokenized is an error at the `calibrate` line."""
        return calibration_text(self.checked)

    # The graph passes ----------------------------------------------------------------------

    def graph_pass(self, step: PlanStep, graph_pass: Any = None, resolution: dict | None = None,
                   record: dict | None = None) -> PlanStep | None:  # fmt: skip
        """Run a step's graph pass (by default the one its action names, built from the step)
        under the pass contract, a layer at a time where the weights stream; records it for the
        report. Returns the step with `resolution` added to its parameters, if any."""
        from dataclasses import replace

        from surgery.backend.report import pass_record
        from surgery.executor.graph_passes import run_on_graph
        from surgery.passes import PASSES

        if not step.layers:
            return None
        graph_pass = graph_pass or PASSES[step.action].from_step(step)
        result = run_on_graph(graph_pass, self.graph, self.scratch_folder(), self.progress)
        self.progress(f"{step.action}: {result.summary}")
        self.passes.append({**pass_record(graph_pass, result, step.source), **(record or {})})
        return replace(step, parameters={**step.parameters, **resolution}) if resolution else None

    # Work beside the steps -----------------------------------------------------------------

    def background(self, work: Callable[[], Any]) -> Future:
        """Run `work` on the run's one background thread."""
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1)
        return self._background.submit(work)

    def close(self) -> None:
        """Wait for background work and stop its thread."""
        if self._background is not None:
            self._background.shutdown(wait=True)
            self._background = None


@contextmanager
def calibration_text(checked: CheckedRecipe):
    """A TextSourceError becomes a RecipeError at the `calibrate` line (`check` counts the tokens
    exactly when the tokenizer loads without the weights; otherwise it can only bound them, and
    the count is made here)."""
    from surgery.data import TextSourceError

    try:
        yield
    except TextSourceError as problem:
        span = checked.calibration_span or checked.model_span
        raise RecipeError([Diagnostic("error", str(problem), span, problem.hint)]) from None
