"""The plan: the program `apply` runs, step by step, printed before anything heavy runs.

Each step names its action, its parameters, its concrete targets (module paths of the
original model) and the recipe span it came from, and runs itself under the executor
(surgery/executor/). The planner (surgery/front/planner.py) orders them: importance analysis, graph
passes in recipe order, export, verification against PyTorch, ONNX passes (quantization), and
the perplexity check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgery.analysis.mixed_precision import FORMATS
from surgery.diagnostics import Diagnostic
from surgery.export.options import ExportOptions
from surgery.formats.names import EMBEDDING, LINEAR_ORDER, linear_kind
from surgery.formats.weights import QuantizedTarget, WeightFormat
from surgery.front.plan_step import PlanStep
from surgery.layers import format_layers


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

    def step(self, action: str) -> PlanStep | None:
        """The first step with this action, if any."""
        return next((step for step in self.steps if step.action == action), None)

    def streams(self, phases: tuple[str, ...] | None = None) -> bool:
        """Whether the weights can stay in the checkpoint, read a layer at a time: no step (of
        `phases`, default all) needs the whole model in memory."""
        return not any(step.needs_whole_model for step in self.steps if phases is None or step.phase in phases)

    def quantization(self) -> dict[str, QuantizedTarget]:
        """Final format per quantized tensor (linear layers, and `model.embed_tokens` for the
        embedding): later quantize statements override earlier ones."""
        final: dict[str, QuantizedTarget] = {}
        for step in self.steps:
            if step.action == "quantize":
                p = step.parameters
                target = _target(p)
                for linear in step.targets:
                    final[linear] = target
        return final

    def chooses_formats(self) -> bool:
        """Whether a `quantize model to <bits> bits per weight` leaves the formats to the run."""
        return any(t.bits_per_weight is not None for t in self.quantization().values())

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
                "quantized_linears": _count_widths(self.quantization()),
            },
        }

    def render(self) -> str:
        """Human-readable plan, as `surgery plan` prints it."""
        m = self.model
        lines = [f"plan for {self.recipe_name} on {m['spec']} ({m['architecture']}, {m['layers']} layers)"]
        for number, step in enumerate(self.steps, 1):
            where = f"  [{step.source.location()}]" if step.source else "  [default]"
            lines.append(f"  {number}. {step.describe()}{where}")
            if step.parameters.get("selected_by"):
                lines.append(f"       selected: {step.parameters['selected_by']}")
                scores = step.parameters["scores"]
                lines.extend(_wrap(" ".join(f"{layer}={value:.4g}" for layer, value in scores.items()), indent=9))
            if step.action == "quantize" and step.layers:
                linears = [t for t in step.targets if t != EMBEDDING]
                kinds = sorted({linear_kind(t) for t in linears} & set(LINEAR_ORDER), key=LINEAR_ORDER.index)
                also = " and the embedding" if len(linears) < len(step.targets) else ""
                lines.append(f"       {len(linears)} linear layers ({', '.join(kinds)} of each layer){also}")
            elif "resolved_groups" in step.parameters:
                lines.append("       groups of original experts per layer (most used first):")
                for layer, groups in step.parameters["resolved_groups"].items():
                    text = " ".join("[" + " ".join(map(str, g)) + "]" for g in groups)
                    lines.append(f"         layer {layer}: {text}")
            elif "resolved_kept" in step.parameters:
                lines.append("       experts kept per layer:")
                for layer, kept in step.parameters["resolved_kept"].items():
                    lines.append(f"         layer {layer}: {' '.join(map(str, kept))}")
            elif step.targets:
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
        widths = _count_widths(self.quantization())
        if widths:
            lines.append("  quantized linear layers: " + ", ".join(f"{n} at {w}" for w, n in widths.items()))
        embedding = self.quantization().get(EMBEDDING)
        if embedding and embedding.bits_per_weight is not None:
            lines.append("  quantized embedding: chosen with the head (it reads the head's tensors when tied)")
        elif embedding:
            lines.append(f"  quantized embedding: {embedding.format.name}")
        return "\n".join(lines)


def _target(p: dict[str, Any]) -> QuantizedTarget:
    """A quantize step's parameters as the target of each linear it names."""
    # A preset's targets hold the smallest format until the run chooses.
    stored = FORMATS[0] if p["part"] == "model" else WeightFormat.from_json(p)
    return QuantizedTarget(stored, bool(p.get("gptq")), bool(p.get("weighted")), bool(p.get("act_order")),
                           p.get("bits_per_weight"))  # fmt: skip


def _count_widths(assignment: dict[str, QuantizedTarget]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for target, config in assignment.items():
        if target == EMBEDDING:
            continue
        key = "int4 or int8, chosen by sensitivity" if config.bits_per_weight is not None else config.format.name
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


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
