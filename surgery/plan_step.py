"""A plan step: plain data that says what one statement (or a default) will do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surgery.source import Span


@dataclass(frozen=True)
class PlanStep:
    """One step of the plan."""

    action: str
    phase: str  # "analyze", "graph" (a pass over the decoder graph), "export", "verify", "onnx", "evaluate"
    parameters: dict[str, Any] = field(default_factory=dict)
    layers: tuple[int, ...] = ()
    targets: tuple[str, ...] = ()
    source: Span | None = None
    note: str = ""

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
