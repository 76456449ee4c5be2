"""The planner: a checked recipe resolved into the plan's ordered, typed steps.

Importance selectors are resolved here, so the plan shows which layers they chose and the
scores that chose them; `build_plan` needs those scores (`surgery plan` computes or reads
them from the cache first). Each statement module plans its own steps (`plan(state)`); the
planner adds its two defaults, importance analysis and verification against PyTorch (their
step kinds are below), and orders every step by phase (within a phase, the order planned).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from surgery.export.options import plan_quantizes_cache, verification_pads_prompts
from surgery.front.checked import CheckedRecipe
from surgery.front.plan import Plan
from surgery.front.plan_step import PlanStep, Run
from surgery.front.selection import ImportanceQuery, ranking, resolve_query
from surgery.front.statements import STATEMENTS
from surgery.front.statements.base import PlanState
from surgery.importance.file import ImportanceFile
from surgery.importance.metrics import METRICS, MetricScores

VERIFY_DECODE_STEPS = 8


@dataclass(frozen=True)
class ComputeImportanceStep(PlanStep):
    """`compute importance`: the scores every importance selector ranks by, on the unmodified
    model. They are computed (or read from the cache) before planning, since the plan's
    selections need them; running the step records them in the report."""

    timing: ClassVar[str] = "importance"

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        text = "compute importance: " + ", ".join(p["metrics"])
        if p["calibration"]:
            c = p["calibration"]
            text += f' on "{c["data"]}", {c["samples"]} samples x {c["length"]} tokens, seed {c["seed"]}'
        return text

    def run(self, run: Run) -> None:
        """Record the scores the plan was made with."""
        run.sections["importance"] = run.scores().to_json()


@dataclass(frozen=True)
class VerifyStep(PlanStep):
    """`verify`: the exported model against PyTorch on prompts, prefill and decode."""

    timing: ClassVar[str] = "verify"

    @property
    def needs_whole_model(self) -> bool:
        """Below fp32 the reference is PyTorch cast to the element type as a whole."""
        return self.parameters["precision"] != "fp32"

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        return (
            f"verify against PyTorch{' in ' + p['precision'] if p.get('precision', 'fp32') != 'fp32' else ''}: "
            f"prefill {p['prompts']} {'left-padded prompts' if p.get('padded', True) else 'prompts cut to one length'}"
            f" + {p['decode_steps']} decode steps, "
            f"max |logit diff| <= {p['tolerance']:g}"
            + (" (before quantization)" if p.get("before_quantization") else "")
            + (" with the quantized weights" if p.get("quantized_weights") else "")
            + ("; teacher-forced, one layer loaded at a time" if p.get("layerwise") else "")
        )

    def before_export(self, run: Run) -> None:
        """Whole-model verification traces PyTorch while the exporter writes (both release the GIL)."""
        from surgery.executor.verification import start_reference_trace

        start_reference_trace(run, self.parameters["decode_steps"])

    def run(self, run: Run) -> None:
        """Compare onnxruntime's logits and tokens with PyTorch's."""
        from surgery.executor.verification import verify

        verify(run, self.parameters["decode_steps"])


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


def build_plan(checked: CheckedRecipe, verify: bool = True, computed: ImportanceFile | None = None) -> Plan:
    """Resolve the checked recipe into ordered steps with concrete targets.

    `computed` holds the scores of `checked.metrics_to_compute()`; it may be None when no
    selector ranks by a computed metric.
    """
    index = checked.index
    scores = _Scores(checked, computed)
    warnings = list(checked.warnings)
    blocks = set(range(index.num_layers))
    attention = set(index.attention_layers)  # a convolution layer (LFM2) has none to drop
    mlp = set(blocks)
    steps: list[PlanStep] = []
    metrics = checked.metrics_to_compute()
    if metrics:
        needs_data = any(METRICS[m].needs_data for m in metrics)
        steps.append(
            ComputeImportanceStep(
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
        quantized = any(step.phase == "onnx" for step in steps)
        # Streamed when no step needs the whole model, this one included (below fp32 it does).
        layerwise = not any(step.needs_whole_model for step in steps) and export.precision == "fp32"
        steps.append(
            VerifyStep(
                action="verify",
                phase="verify",
                parameters={
                    "prompts": 2,
                    "decode_steps": VERIFY_DECODE_STEPS,
                    "tolerance": export.element.tolerance,
                    "precision": export.precision,
                    "padded": verification_pads_prompts(export.target, plan_quantizes_cache(steps)),
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
    """Every step of an earlier phase first, and within a phase the order the statements were
    planned in (graph passes in recipe order): a stable sort by phase. The phases are a total
    order and the executor runs one step at a time, so this is the whole schedule (no step
    kind today reads what a later step of an earlier phase writes; docs/design.md says more)."""
    return sorted(steps, key=lambda step: _PHASES.index(step.phase))
