"""The plan: plain data saying what `apply` will do, step by step, before anything heavy runs.

Each step names its action, its parameters, its concrete targets (module paths of the
original model) and the recipe span it came from. Steps form a dependency graph whose
topological order is the execution order: importance analysis (shared by every selector that
ranks by a computed metric), graph passes in recipe order, export, verification against
PyTorch, ONNX passes (quantization), and the perplexity check.

Importance selectors are resolved here, so the plan shows which layers they chose and the
scores that chose them; `build_plan` needs those scores (`surgery plan` computes or reads
them from the cache first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import networkx as nx

from surgery.checked import CheckedRecipe
from surgery.diagnostics import Diagnostic
from surgery.export.options import ExportOptions, verification_pads_prompts
from surgery.importance.file import ImportanceFile
from surgery.importance.metrics import METRICS, MetricScores
from surgery.layers import format_layers
from surgery.plan_step import PlanStep
from surgery.selection import ImportanceQuery, ranking, resolve_query
from surgery.statements import STATEMENTS, for_action
from surgery.statements.base import PlanState
from surgery.statements.quantize import EMBEDDING

VERIFY_DECODE_STEPS = 8


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

    def quantization(self) -> dict[str, dict[str, Any]]:
        """Final width per quantized tensor (linear layers, and `model.embed_tokens` for the
        embedding): later quantize statements override earlier ones."""
        final: dict[str, dict[str, Any]] = {}
        for step in self.steps:
            if step.action == "quantize":
                p = step.parameters
                for linear in step.targets:
                    final[linear] = {"bits": p["bits"], "block": p["block"], "symmetric": p["symmetric"],
                                     "gptq": bool(p.get("gptq"))}  # fmt: skip
        return final

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
            lines.append(f"  {number}. {_describe(step)}{where}")
            if step.parameters.get("selected_by"):
                lines.append(f"       selected: {step.parameters['selected_by']}")
                scores = step.parameters["scores"]
                lines.extend(_wrap(" ".join(f"{layer}={value:.4g}" for layer, value in scores.items()), indent=9))
            if step.action == "quantize" and step.layers:
                kinds = sorted({t.rsplit(".", 1)[-1] for t in step.targets}, key=_LINEAR_ORDER.index)
                lines.append(f"       {len(step.targets)} linear layers ({', '.join(kinds)} of each layer)")
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
        if embedding:
            lines.append(f"  quantized embedding: int{embedding['bits']}")
        return "\n".join(lines)


_LINEAR_ORDER = ["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _count_widths(assignment: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for target, config in assignment.items():
        if target == EMBEDDING:
            continue
        key = f"int{config['bits']}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _describe(step: PlanStep) -> str:
    """One line for a step: its statement module's description, or the plan's own steps'."""
    module = for_action(step.action)
    if module is not None:
        return module.describe(step)
    p = step.parameters
    if step.phase == "analyze":
        text = "compute importance: " + ", ".join(p["metrics"])
        if p["calibration"]:
            c = p["calibration"]
            text += f' on "{c["data"]}", {c["samples"]} samples x {c["length"]} tokens, seed {c["seed"]}'
        return text
    return (
        f"verify against PyTorch{' in ' + p['precision'] if p.get('precision', 'fp32') != 'fp32' else ''}: "
        f"prefill {p['prompts']} {'left-padded prompts' if p.get('padded', True) else 'prompts cut to one length'}"
        f" + {p['decode_steps']} decode steps, "
        f"max |logit diff| <= {p['tolerance']:g}"
        + (" (before quantization)" if p.get("before_quantization") else "")
        + (" with the quantized weights" if p.get("quantized_weights") else "")
        + ("; teacher-forced, one layer loaded at a time" if p.get("layerwise") else "")
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


class _Scores:
    """Scores for importance queries: computed metrics, or metrics read from importance files."""

    def __init__(self, checked: CheckedRecipe, computed: ImportanceFile | None):
        self.checked, self.computed = checked, computed

    def __call__(self, query: ImportanceQuery) -> MetricScores:
        source = query.source
        if source.file is not None:
            return self.checked.importance_files[source.file].metrics[source.metric]
        if self.computed is None or source.metric not in self.computed.metrics:
            raise ValueError(f"the plan needs {source.metric} scores; compute them first")
        return self.computed.metrics[source.metric]


def _selection(query: ImportanceQuery, scores: MetricScores, candidates: list[int]) -> tuple[tuple[int, ...], dict]:
    """Resolve a query; the step parameters that show how (ranking scores of the chosen layers)."""
    layers = resolve_query(query, scores, candidates)
    values = scores.scores[query.part]
    order = [layer for layer in ranking(scores, query.part, candidates) if layer in layers]
    more = "higher" if scores.more_important == "higher" else "lower"
    return layers, {
        "selected_by": f"{query.describe()}; {more} = more important; {len(layers)} of {len(candidates)} candidates",
        "scores": {layer: round(values[layer], 6) for layer in order},
    }


def streams_weights(checked: CheckedRecipe, run_verification: bool) -> bool:
    """Whether an apply can leave the weights in the checkpoint and read them a layer at a time.

    Importance scores, the original model's perplexity and the exporter already work layer by
    layer, drops only remove nodes, and linear layers are quantized as they are written;
    verification then runs teacher-forced and layer-major (`surgery.verify_layerwise`). Prune
    and merge experts rewrite a layer at a time, its new weights written aside
    (`surgery.pipeline.run_on_graph`). What still needs the whole model loaded: split and fuse
    (passes that rewrite weights across the model), a quantized embedding (an ONNX pass over
    the written table), and verification below fp32 (the reference is cast to the element type
    as a whole).
    """
    if checked.of("fuse") or checked.of("split"):
        return False
    if any(q.part == "embedding" for q in checked.of("quantize")):
        return False
    return not run_verification or checked.export.precision == "fp32"


def build_plan(checked: CheckedRecipe, verify: bool = True, computed: ImportanceFile | None = None) -> Plan:
    """Resolve the checked recipe into ordered steps with concrete targets.

    `computed` holds the scores of `checked.metrics_to_compute()`; it may be None when no
    selector ranks by a computed metric.
    """
    index = checked.index
    scores = _Scores(checked, computed)
    warnings = list(checked.warnings)
    blocks = set(range(index.num_layers))
    attention = set(blocks)
    mlp = set(blocks)
    steps: list[PlanStep] = []
    metrics = checked.metrics_to_compute()
    if metrics:
        needs_data = any(METRICS[m].needs_data for m in metrics)
        steps.append(
            PlanStep(
                action="compute importance",
                phase="analyze",
                parameters={
                    "metrics": list(metrics),
                    "calibration": asdict(checked.calibration) if needs_data else None,
                },
                source=checked.calibration_span,
            )
        )
    c = checked.calibration
    state = PlanState(
        checked=checked,
        select=lambda query, candidates: _selection(query, scores(query), candidates),
        computed_scores=lambda metric: scores.computed.metrics[metric],
        blocks=blocks,
        attention=attention,
        mlp=mlp,
        warnings=warnings,
        counted=f'counted on "{c.data}" ({c.samples} x {c.length} tokens) after the steps before',
    )
    for module in STATEMENTS:
        steps.extend(module.plan(state))
    export = checked.export
    if verify:
        quantized = any(step.action == "quantize" for step in steps)
        layerwise = streams_weights(checked, verify)
        steps.append(
            PlanStep(
                action="verify",
                phase="verify",
                parameters={
                    "prompts": 2,
                    "decode_steps": VERIFY_DECODE_STEPS,
                    "tolerance": export.element.tolerance,
                    "precision": export.precision,
                    "padded": verification_pads_prompts(export.target),
                    # Streamed: onnxruntime's tokens fed to PyTorch layer by layer; quantized
                    # linears are checked exactly, against PyTorch with the quantized weights.
                    "layerwise": layerwise,
                    "before_quantization": quantized and not layerwise,
                    "quantized_weights": quantized and layerwise,
                },
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
        warnings=tuple(warnings),
    )


_PHASES = ("analyze", "graph", "export", "verify", "onnx", "evaluate")


def _execution_order(steps: list[PlanStep]) -> list[PlanStep]:
    """Order steps by their dependencies: every step of an earlier phase first, and within a
    phase the order the statements were planned in (graph passes in recipe order)."""
    dependencies = nx.DiGraph()
    dependencies.add_nodes_from(range(len(steps)))
    for i, step in enumerate(steps):
        for j, other in enumerate(steps):
            earlier_phase = _PHASES.index(other.phase) < _PHASES.index(step.phase)
            if earlier_phase or (other.phase == step.phase and j < i):
                dependencies.add_edge(j, i)
    return [steps[i] for i in nx.lexicographical_topological_sort(dependencies)]
