"""A plan step: plain data that says what one statement (or a default) will do, and runs itself.

Each statement module defines the step kinds it plans (subclasses of `PlanStep`), beside its
syntax node and its check: the step describes itself for `surgery plan`, says what it needs
(`needs_whole_model`), and runs under the executor (surgery/executor/), which hands it the
run's state. The executor knows no step kind by name: what the report says ran is the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from surgery.source import Span


class Run(Protocol):
    """The state a step runs over: surgery.executor.run.Run (named here so that the plan, below
    the executor, need not import it)."""

    plan: Any
    graph: Any
    progress: Any

    def graph_pass(self, step: PlanStep, graph_pass: Any = None, resolution: dict | None = None,
                   record: dict | None = None) -> PlanStep | None:  # fmt: skip
        """Run a step's graph pass and record it (surgery.executor.run.Run.graph_pass)."""


@dataclass(frozen=True)
class PlanStep:
    """One step of the plan: its data, and what it does when the executor runs it."""

    action: str
    phase: str  # "analyze", "graph" (a pass over the decoder graph), "export", "verify", "onnx", "evaluate"
    parameters: dict[str, Any] = field(default_factory=dict)
    layers: tuple[int, ...] = ()
    targets: tuple[str, ...] = ()
    source: Span | None = None
    note: str = ""

    # The report's timing this step's run is counted under.
    timing: ClassVar[str] = ""
    # Steps of this kind act as one (`run_all` gets every one of them, in plan order).
    together: ClassVar[bool] = False

    def to_json(self) -> dict[str, Any]:
        """Plain data for `surgery plan --json` and the report."""
        return {
            "action": self.action,
            "phase": self.phase,
            "parameters": self.parameters,
            "layers": list(self.layers),
            "targets": list(self.targets),
            "source": self.source.to_json() if self.source else None,
            "note": self.note,
        }

    def describe(self) -> str:
        """One line for `surgery plan`."""
        return self.action

    @property
    def needs_whole_model(self) -> bool:
        """Whether this step needs every weight in memory at once (else the executor streams the
        weights from the checkpoint, a layer at a time)."""
        return False

    def prepare(self, run: Run) -> None:
        """Called before any step runs, on the unmodified model (a reference measured there)."""

    def before_export(self, run: Run) -> None:
        """Called once the graph is final, before the export writes it (work that overlaps it)."""

    def run(self, run: Run) -> PlanStep | None:
        """Do the step; returns the step with what it resolved while running (or None)."""
        raise NotImplementedError(f"step '{self.action}' has no run")

    @classmethod
    def run_all(cls, run: Run, steps: list[PlanStep]) -> list[PlanStep] | None:
        """Run every step of this kind (for kinds that act `together`)."""
        return [step.run(run) or step for step in steps]


@dataclass(frozen=True)
class GraphPassStep(PlanStep):
    """A step that is one pass over the decoder graph: by default the pass its action names
    (passes/<action>.py, built from the step), run under its contract, a layer at a time where
    the weights stream."""

    timing: ClassVar[str] = "passes"

    def run(self, run: Run) -> PlanStep | None:
        """Run the step's graph pass."""
        return run.graph_pass(self)
