"""The plan: plain data saying what `apply` will do, step by step, before anything heavy runs.

Each step names its action, its parameters, its concrete targets (module paths of the
original model) and the recipe span it came from. Steps form a dependency graph (passes in
recipe order, then export, then verification) whose topological order is the execution
order; later issues add analysis steps that several passes depend on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from surgery.check import CheckedRecipe
from surgery.diagnostics import Diagnostic
from surgery.export.options import ExportOptions
from surgery.layers import format_layers
from surgery.source import Span

VERIFY_TOLERANCE = 1e-3  # max |logit difference| between ONNX Runtime and PyTorch, fp32
VERIFY_DECODE_STEPS = 8


@dataclass(frozen=True)
class PlanStep:
    """One step of the plan."""

    action: str
    phase: str  # "graph" (a pass over the decoder graph), "export", or "verify"
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


@dataclass(frozen=True)
class Plan:
    """The ordered steps and the model structure they lead to."""

    recipe_name: str
    model: dict[str, Any]
    steps: tuple[PlanStep, ...]
    export: ExportOptions
    verify: bool
    layers_after: tuple[int, ...]
    kv_layers_after: tuple[int, ...]
    mlp_layers_after: tuple[int, ...]
    warnings: tuple[Diagnostic, ...] = ()

    def graph_steps(self) -> list[PlanStep]:
        """The steps that are passes over the decoder graph, in order."""
        return [step for step in self.steps if step.phase == "graph"]

    def to_json(self) -> dict[str, Any]:
        """The whole plan as plain data (`surgery plan --json`, and the report)."""
        return {
            "recipe": self.recipe_name,
            "model": self.model,
            "steps": [step.to_json() for step in self.steps],
            "result": {
                "layers": list(self.layers_after),
                "attention_layers": list(self.kv_layers_after),
                "mlp_layers": list(self.mlp_layers_after),
                "kv_cache_slots": {str(slot): layer for slot, layer in enumerate(self.kv_layers_after)}
                if self.export.kv_cache
                else {},
            },
        }

    def render(self) -> str:
        """Human-readable plan, as `surgery plan` prints it."""
        m = self.model
        lines = [f"plan for {self.recipe_name} on {m['spec']} ({m['architecture']}, {m['layers']} layers)"]
        for number, step in enumerate(self.steps, 1):
            where = f"  [{step.source.location()}]" if step.source else "  [default]"
            lines.append(f"  {number}. {_describe(step)}{where}")
            if step.targets:
                lines.extend(_wrap(", ".join(step.targets), indent=7))
            if step.note:
                lines.append(f"       note: {step.note}")
        kept = self.kv_layers_after
        lines.append(
            f"result: {len(self.layers_after)} layers, {len(kept)} with attention, "
            f"{len(self.mlp_layers_after)} with an MLP"
        )
        if self.export.kv_cache:
            lines.append(f"  KV cache slots 0..{len(kept) - 1} -> original layers {format_layers(kept)}")
        return "\n".join(lines)


def _describe(step: PlanStep) -> str:
    if step.phase == "graph":
        return f"{step.action} layers {format_layers(step.layers)}"
    if step.phase == "export":
        p = step.parameters
        return f"export onnx opset {p['opset']} {'with' if p['kv_cache'] else 'without'} kv-cache"
    p = step.parameters
    return (
        f"verify against PyTorch: prefill {p['prompts']} left-padded prompts + {p['decode_steps']} decode steps, "
        f"max |logit diff| <= {p['tolerance']:g}"
    )


def _wrap(text: str, indent: int, width: int = 100) -> list[str]:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + len(word) + indent > width:
            out.append(" " * indent + line.rstrip())
            line = ""
        line += word + " "
    if line:
        out.append(" " * indent + line.rstrip())
    return out


def build_plan(checked: CheckedRecipe, verify: bool = True) -> Plan:
    """Resolve the checked recipe into ordered steps with concrete targets."""
    index = checked.index
    blocks = set(range(index.num_layers))
    attention = set(blocks)
    mlp = set(blocks)
    steps: list[PlanStep] = []
    for drop in checked.drops:
        present = {"attention": attention, "mlp": mlp, "block": blocks}[drop.part]
        # Only what is still there: earlier statements may already have removed a part.
        layers = tuple(layer for layer in drop.layers if layer in present)
        if drop.part == "block":
            blocks -= set(layers)
            attention -= set(layers)
            mlp -= set(layers)
        else:
            present -= set(layers)
        note = "" if layers else "no effect: everything selected was already dropped"
        steps.append(
            PlanStep(
                action=f"drop {drop.part}",
                phase="graph",
                parameters={"layers": list(layers)},
                layers=layers,
                targets=tuple(index.part_path(layer, drop.part) for layer in layers),
                source=drop.statement.span,
                note=note,
            )
        )
    export = checked.export
    steps.append(
        PlanStep(
            action="export onnx",
            phase="export",
            parameters={"opset": export.opset, "kv_cache": export.kv_cache},
            source=checked.export_statement.span if checked.export_statement else None,
        )
    )
    if verify:
        steps.append(
            PlanStep(
                action="verify",
                phase="verify",
                parameters={"prompts": 2, "decode_steps": VERIFY_DECODE_STEPS, "tolerance": VERIFY_TOLERANCE},
            )
        )
    source = checked.recipe.source
    return Plan(
        recipe_name=source.name if source else "<string>",
        model={
            "spec": checked.spec.text,
            "kind": checked.spec.kind,
            "architecture": index.architecture,
            "layers": index.num_layers,
        },
        steps=tuple(_execution_order(steps)),
        export=export,
        verify=verify,
        layers_after=tuple(sorted(blocks)),
        kv_layers_after=tuple(sorted(attention)),
        mlp_layers_after=tuple(sorted(mlp)),
        warnings=checked.warnings,
    )


_PHASES = ("graph", "export", "verify")


def _execution_order(steps: list[PlanStep]) -> list[PlanStep]:
    """Order steps by their dependencies: graph passes in recipe order, then later phases."""
    dependencies = nx.DiGraph()
    dependencies.add_nodes_from(range(len(steps)))
    for i, step in enumerate(steps):
        for j, other in enumerate(steps[:i]):
            same_phase_chain = other.phase == step.phase
            earlier_phase = _PHASES.index(other.phase) < _PHASES.index(step.phase)
            if same_phase_chain or earlier_phase:
                dependencies.add_edge(j, i)
    return [steps[i] for i in nx.lexicographical_topological_sort(dependencies)]
