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

from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx

from surgery.check import CheckedRecipe, ResolvedQuantize, expert_layer_problems
from surgery.diagnostics import Diagnostic, RecipeError, raise_if_errors
from surgery.export.options import ExportOptions
from surgery.importance.file import ImportanceFile
from surgery.importance.metrics import METRICS, MetricScores
from surgery.layers import format_layers
from surgery.selection import ImportanceQuery, ranking, resolve_query
from surgery.source import Span

VERIFY_TOLERANCE = 1e-3  # max |logit difference| between ONNX Runtime and PyTorch, fp32
VERIFY_DECODE_STEPS = 8


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
        """Final width per linear layer: later quantize statements override earlier ones."""
        final: dict[str, dict[str, Any]] = {}
        for step in self.steps:
            if step.action == "quantize":
                p = step.parameters
                for linear in step.targets:
                    final[linear] = {"bits": p["bits"], "block": p["block"], "symmetric": p["symmetric"]}
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
        return "\n".join(lines)


_LINEAR_ORDER = ["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _count_widths(assignment: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for config in assignment.values():
        key = f"int{config['bits']}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _describe(step: PlanStep) -> str:
    p = step.parameters
    if step.phase == "analyze":
        text = "compute importance: " + ", ".join(p["metrics"])
        if p["calibration"]:
            c = p["calibration"]
            text += f' on "{c["data"]}", {c["samples"]} samples x {c["length"]} tokens, seed {c["seed"]}'
        return text
    if step.action == "fuse":
        if p["mode"] == "dynamic":
            return (
                f"fuse into the head, per token, the layer with the lowest IKS among {format_layers(step.layers)}, "
                f"weight {p['weight']:g}"
            )
        return f"fuse layer {step.layers[0]} into the head, weight {p['weight']:g}"
    if step.action == "merge experts":
        rank = ""
        if "rank" in p or "rank_percent" in p:
            asked = f"{p['rank_percent']:g}% of full rank" if "rank_percent" in p else str(p["rank"])
            rank = f", shared subspace of rank {asked}" + (f" = {p['resolved_rank']}" if "resolved_rank" in p else "")
        return (
            f"merge experts of layers {format_layers(step.layers)} into {p['groups']} groups "
            f"(grouping by {p['grouping']}, {p['weighting']}-weighted, neurons aligned{rank})"
        )
    if step.action == "prune experts":
        return f"prune experts of layers {format_layers(step.layers)} to {p['keep']} by frequency"
    if step.action == "split mlp":
        exact = " (all experts: the dense MLP exactly)" if p["top_k"] == p["experts"] else ""
        return f"split mlp of layers {format_layers(step.layers)} into {p['experts']} experts, top {p['top_k']}{exact}"
    if step.phase == "graph":
        return f"{step.action} layers {format_layers(step.layers)}"
    if step.phase == "export":
        positions = ", with position-ids" if p.get("position_ids") else ""
        return f"export onnx opset {p['opset']} {'with' if p['kv_cache'] else 'without'} kv-cache{positions}"
    if step.action == "quantize":
        part = {"layers": "linears", "attention": "attention linears", "mlp": "MLP linears"}.get(p["part"], "")
        layers = f"layers {format_layers(step.layers)}" if step.layers else "no layer"
        what = "head" if p["part"] == "head" else f"{part} of {layers}"
        kind = "symmetric" if p["symmetric"] else "asymmetric"
        return f"quantize {what} to int{p['bits']} (MatMulNBits, block {p['block']}, {kind})"
    if step.action == "verify perplexity":
        return (
            f'perplexity on "{p["data"]}" ({p["tokens"]} tokens) in onnxruntime vs the original model '
            f"in PyTorch: at most +{p['max_increase']:g}%"
        )
    return (
        f"verify against PyTorch: prefill {p['prompts']} left-padded prompts + {p['decode_steps']} decode steps, "
        f"max |logit diff| <= {p['tolerance']:g}" + (" (before quantization)" if p.get("before_quantization") else "")
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
    for drop in checked.drops:
        present = {"attention": attention, "mlp": mlp, "block": blocks}[drop.part]
        extra: dict[str, Any] = {}
        if drop.query is not None:
            layers, extra = _selection(drop.query, scores(drop.query), sorted(present))
        else:
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
                parameters={"layers": list(layers), **extra},
                layers=layers,
                targets=tuple(index.part_path(layer, drop.part) for layer in layers),
                source=drop.statement.span,
                note=note,
            )
        )
    c = checked.calibration
    counted = f'counted on "{c.data}" ({c.samples} x {c.length} tokens) after the steps before'
    for split in checked.splits:
        extra: dict[str, Any] = {}
        if split.query is not None:
            layers, extra = _selection(split.query, scores(split.query), sorted(mlp))
        else:
            layers = tuple(layer for layer in split.layers if layer in mlp)
        parameters = {"experts": split.experts, "top_k": split.top_k, **extra}
        note = "" if layers else "no effect: every selected MLP was dropped"
        steps.append(_mlp_step(index, "split mlp", layers, parameters, split.statement.span, note))
    if any(split.query is not None for split in checked.splits):
        # Which layers an importance-ranked split chose is known only now: the rules `check`
        # applied to explicit splits apply to these layers here.
        split_layers = {
            layer: step.parameters["experts"] for step in steps if step.action == "split mlp" for layer in step.layers
        }
        raise_if_errors(expert_layer_problems(index, split_layers, checked.prunes, checked.merges))
    # Pruning runs first, so merging groups the experts that are kept.
    for prune in checked.prunes:
        layers = tuple(layer for layer in prune.layers if layer in mlp)
        parameters = {"keep": prune.keep, "rule": "frequency"}
        note = f"which experts: the {prune.keep} most used per layer, {counted}"
        steps.append(_mlp_step(index, "prune experts", layers, parameters, prune.statement.span, note))
    for merge in checked.merges:
        layers = tuple(layer for layer in merge.layers if layer in mlp)
        parameters = {"groups": merge.groups, "grouping": merge.grouping, "weighting": merge.weighting}
        if merge.rank is not None:
            parameters["rank"] = merge.rank
        if merge.rank_percent is not None:
            parameters["rank_percent"] = merge.rank_percent
        note = f"groups: from statistics {counted}"
        steps.append(_mlp_step(index, "merge experts", layers, parameters, merge.statement.span, note))
    if checked.fuse is not None:
        steps.append(_fuse_step(checked, scores, blocks, mlp, warnings))
    export = checked.export
    quantize_steps = _quantize_steps(checked, scores, blocks, attention, mlp, warnings)
    steps.append(
        PlanStep(
            action="export onnx",
            phase="export",
            parameters={"opset": export.opset, "kv_cache": export.kv_cache, "position_ids": export.position_ids},
            source=checked.export_statement.span if checked.export_statement else None,
        )
    )
    if verify:
        steps.append(
            PlanStep(
                action="verify",
                phase="verify",
                parameters={
                    "prompts": 2,
                    "decode_steps": VERIFY_DECODE_STEPS,
                    "tolerance": VERIFY_TOLERANCE,
                    "before_quantization": bool(quantize_steps),
                },
            )
        )
    steps.extend(quantize_steps)
    if checked.perplexity is not None:
        check = checked.perplexity
        steps.append(
            PlanStep(
                action="verify perplexity",
                phase="evaluate",
                parameters={"data": check.data, "max_increase": check.max_increase, "tokens": check.tokens},
                source=check.span,
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


def _mlp_step(index, action: str, layers: tuple[int, ...], parameters: dict, source, note: str) -> PlanStep:
    """A graph step acting on the MLPs of `layers` (split, merge, prune)."""
    return PlanStep(
        action=action,
        phase="graph",
        parameters={"layers": list(layers), **parameters},
        layers=layers,
        targets=tuple(index.part_path(layer, "mlp") for layer in layers),
        source=source,
        note=note,
    )


def _fuse_step(
    checked: CheckedRecipe, scores: _Scores, blocks: set[int], mlp: set[int], warnings: list[Diagnostic]
) -> PlanStep:
    """The fuse step: a static layer (given, or chosen by lowest calibration IKS) or dynamic candidates."""
    fuse = checked.fuse
    span = fuse.statement.span
    parameters: dict[str, Any] = {"mode": "dynamic" if fuse.mode == "dynamic" else "static", "weight": fuse.weight}
    if fuse.mode == "static":
        if fuse.layer not in blocks:
            raise RecipeError(
                [Diagnostic("error", f"layer {fuse.layer} cannot be fused: its block is dropped", span,
                            "layer numbers are the original model's; fuse a layer that is kept")]
            )  # fmt: skip
        layers: tuple[int, ...] = (fuse.layer,)
    else:
        # A dynamic candidate needs its MLP (IKS compares before and after it); auto only a kept block.
        usable = blocks & mlp if fuse.mode == "dynamic" else blocks
        layers = tuple(c for c in fuse.candidates if c in usable)
        gone = [c for c in fuse.candidates if c not in usable]
        if gone:
            warnings.append(
                Diagnostic("warning", f"candidate layer(s) {format_layers(gone)} are dropped and not considered", span)
            )
        if not layers:
            raise RecipeError([Diagnostic("error", "no candidate layer is left after the drops", span)])
        parameters["candidates"] = list(fuse.candidates)
        if fuse.mode == "auto":
            iks = scores.computed.metrics["iks"].scores["block"]
            ranked = sorted(layers, key=lambda layer: (iks[layer], layer))
            parameters["selected_by"] = f"lowest mean IKS (calibration) among candidates {format_layers(layers)}"
            parameters["scores"] = {layer: round(iks[layer], 6) for layer in ranked}
            layers = (ranked[0],)
    note = "weight 0: the head is unchanged" if fuse.weight == 0 else ""
    return PlanStep(
        action="fuse",
        phase="graph",
        parameters={**parameters, "layers": list(layers)},
        layers=layers,
        targets=("lm_head",),
        source=span,
        note=note,
    )


def _quantize_steps(
    checked: CheckedRecipe,
    scores: _Scores,
    blocks: set[int],
    attention: set[int],
    mlp: set[int],
    warnings: list[Diagnostic],
) -> list[PlanStep]:
    """One step per quantize statement or rule, targets = the exported linears it converts."""
    index = checked.index
    steps: list[PlanStep] = []
    owner: dict[str, ResolvedQuantize] = {}  # linear -> the statement that last set its width
    taken: dict[int, set[int]] = {}  # group -> layers its earlier rules matched
    for item in checked.quantize:
        parameters: dict[str, Any] = {
            "part": item.part,
            "bits": item.bits,
            "block": item.block,
            "symmetric": item.symmetric,
        }
        if item.part == "head":
            layers: tuple[int, ...] = ()
            targets = ["lm_head"]
        else:
            present = {"layers": blocks, "attention": attention, "mlp": mlp}[item.part]
            candidates = sorted(present)
            if item.group is not None:
                candidates = [layer for layer in candidates if layer not in taken.get(item.group, set())]
            if item.query is not None:
                # A rule ranks over every layer that has the part, so `most important 50%` after
                # `most important 25%` in one group means the top half, whose top quarter is taken.
                layers, extra = _selection(item.query, scores(item.query), sorted(present))
                layers = tuple(layer for layer in layers if layer in candidates)
                parameters.update(extra)
            elif item.rest:
                layers = tuple(candidates)
            else:
                layers = tuple(layer for layer in item.layers if layer in candidates)
            if item.group is not None:
                taken.setdefault(item.group, set()).update(layers)
            targets = []
            for layer in layers:
                if item.part in ("layers", "attention") and layer in attention:
                    targets += index.linear_names(layer, "attention")
                if item.part in ("layers", "mlp") and layer in mlp:
                    targets += index.linear_names(layer, "mlp")
        note = ""
        if item.part != "head" and not layers:
            reason = "earlier rules of the group took them" if item.group is not None else "they were all dropped"
            note = f"no effect: no layer left to match ({reason})"
            warnings.append(Diagnostic("warning", "this quantize selection matches no layers", item.span, reason))
        overridden = sorted({owner[t].span.line for t in targets if t in owner})
        if overridden:
            warnings.append(
                Diagnostic(
                    "warning",
                    f"overrides the quantization set on line {', '.join(map(str, overridden))} for some linear layers",
                    item.span,
                    "the later statement wins",
                )
            )
        for target in targets:
            owner[target] = item
        steps.append(
            PlanStep(
                action="quantize",
                phase="onnx",
                parameters={**parameters, "layers": list(layers)},
                layers=layers,
                targets=tuple(targets),
                source=item.span,
                note=note,
            )
        )
    return steps


_PHASES = ("analyze", "graph", "export", "verify", "onnx", "evaluate")


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
