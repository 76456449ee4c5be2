"""The pass contract: `requires` -> `apply` -> `ensures`, checked by the framework.

A pass is a frozen dataclass whose fields are its parameters (so a plan step can be printed
and rebuilt from plain data). It declares `name` (its recipe keyword) and whether it preserves
the model's semantics. `run_pass` refuses to apply a pass whose preconditions fail and reports
a pass whose postconditions fail, naming the pass either way.

Two kinds of pass share the contract: `GraphPass` rewrites the decoder graph before export,
`OnnxPass` rewrites the exported ONNX model (an `onnx.ModelProto`, weights loaded).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.ir.graph import DecoderGraph

if TYPE_CHECKING:
    import onnx


class PassContractError(Exception):
    """A pass's precondition or postcondition does not hold."""

    def __init__(self, pass_name: str, phase: str, problems: list[str]):
        self.pass_name, self.phase, self.problems = pass_name, phase, problems
        super().__init__(f"pass '{pass_name}' {phase} failed: " + "; ".join(problems))


@dataclass(frozen=True)
class PassResult:
    """What a pass did: whether the graph changed, and a line for the report."""

    modified: bool
    summary: str


@dataclass(frozen=True)
class GraphPass(ABC):
    """A rewrite of the decoder graph. Subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str]
    preserves_semantics: ClassVar[bool]

    @classmethod
    def from_step(cls, step: Any) -> GraphPass:
        """The pass a plan step asks for (most passes take only the step's layers)."""
        return cls(layers=step.layers)

    def requires(self, graph: DecoderGraph) -> list[str]:
        """Preconditions; each returned string is a violated one."""
        return []

    @abstractmethod
    def apply(self, graph: DecoderGraph) -> PassResult:
        """Rewrite the graph in place."""

    def ensures(self, graph: DecoderGraph) -> list[str]:
        """Postconditions; each returned string is a violated one."""
        return []

    def parameters(self) -> dict[str, Any]:
        """The pass's fields as plain data."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class OnnxPass(ABC):
    """A rewrite of the exported ONNX model, in place. Subclasses are frozen dataclasses."""

    name: ClassVar[str]
    preserves_semantics: ClassVar[bool]

    def requires(self, model: onnx.ModelProto) -> list[str]:
        """Preconditions; each returned string is a violated one."""
        return []

    @abstractmethod
    def apply(self, model: onnx.ModelProto) -> PassResult:
        """Rewrite the model in place."""

    def ensures(self, model: onnx.ModelProto) -> list[str]:
        """Postconditions; each returned string is a violated one."""
        return []

    def parameters(self) -> dict[str, Any]:
        """The pass's fields as plain data."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def parts_present(graph: DecoderGraph, layers: tuple[int, ...], part: str) -> list[str]:
    """Problems unless every layer is in the graph and still has `part` ("attention" or "mlp")."""
    problems = []
    for index in layers:
        layer = graph.layer(index)
        if layer is None:
            problems.append(f"layer {index} is not in the graph")
        elif not (layer.has_attention if part == "attention" else layer.has_mlp):
            problems.append(f"layer {index} has no {'MLP' if part == 'mlp' else part} to drop")
    return problems


def run_pass(
    graph_pass: GraphPass | OnnxPass, graph: Any, apply: Callable[[Any], PassResult] | None = None
) -> PassResult:
    """Run one pass (on a DecoderGraph or an onnx.ModelProto) under its contract.

    `apply`, when given, does the pass's work instead of `graph_pass.apply` (the same pass run
    a layer at a time: `surgery.executor.graph_passes.run_on_graph`); the contract is checked the same way.
    """
    problems = graph_pass.requires(graph)
    if problems:
        raise PassContractError(graph_pass.name, "precondition", problems)
    result = (apply or graph_pass.apply)(graph)
    problems = graph_pass.ensures(graph)
    if problems:
        raise PassContractError(graph_pass.name, "postcondition", problems)
    return result
