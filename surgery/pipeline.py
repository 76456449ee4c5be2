"""The whole compiler in order: parse -> check -> importance -> plan -> passes -> export ->
verify -> ONNX passes -> perplexity -> report.

Everything else hangs off this module. `check_recipe` is the weight-free part (`surgery
check`); `compile_recipe` adds the plan, computing importance scores first when a selector
ranks by a computed metric (`surgery plan`; results are cached); `apply` does the rest.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.check import check
from surgery.checked import MIN_PERPLEXITY_TOKENS, CheckedRecipe
from surgery.diagnostics import Diagnostic, RecipeError
from surgery.export.options import verification_pads_prompts
from surgery.files import RECIPE_LIMIT, InputFileError, read_source
from surgery.formats.precision import FP32
from surgery.formats.precision import precision as precision_record
from surgery.output import OutputFolder
from surgery.parser import parse_source
from surgery.plan import VERIFY_DECODE_STEPS, Plan, build_plan, streams_weights
from surgery.source import Source
from surgery.statements.quantize import EMBEDDING

if TYPE_CHECKING:
    from surgery.importance.compute import ScoreRequest
    from surgery.importance.file import ImportanceFile
    from surgery.verify import Verification

Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


@dataclass(frozen=True)
class Compiled:
    """A recipe taken as far as its plan."""

    text: str
    checked: CheckedRecipe
    plan: Plan
    searches: tuple = ()  # SearchResult of each `as many as fit`, in the order they ran


@dataclass(frozen=True)
class ApplyResult:
    """Where the output went and what verification found."""

    output: Path
    report: dict
    verification: Verification | None
    perplexity_passed: bool | None = None
    searches: tuple = ()  # SearchResult of each `as many as fit`


def read_recipe(path: str) -> Source:
    """The recipe as a Source: a regular file of at most 1 MiB of UTF-8. Raises RecipeError."""
    try:
        return read_source(path, "recipe", RECIPE_LIMIT)
    except InputFileError as problem:
        raise RecipeError([Diagnostic("error", str(problem), problem.span, problem.hint)]) from None


@contextmanager
def _collector_paused():
    """Pause Python's cycle collector while a recipe is parsed and checked.

    Parsing allocates many small objects; with torch and transformers loaded, each full
    collection walks millions of their objects, which made checking a recipe of 10,000 lines
    take seconds instead of a fraction of one. The work is bounded by the recipe's size (1 MiB),
    and the collector runs again right after.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_recipe(path: str, model: str | None = None, text: str | None = None) -> tuple[str, CheckedRecipe]:
    """Parse and check a recipe file against its model's config. Raises RecipeError.

    With `text`, that text is checked as if it were the file at `path` (relative paths start
    at its folder): how a search's candidates and settled recipe are checked.
    """
    with _collector_paused():
        source = read_recipe(path) if text is None else Source(path, text)
        recipe = parse_source(source)
        return source.text, check(recipe, model_override=model)


def settle_searches(path: str, checked: CheckedRecipe, model: str | None, progress: Progress,
                    settings=None, device: str | None = None) -> tuple[CheckedRecipe, tuple]:  # fmt: skip
    """Run every `as many as fit` search of a checked recipe (surgery/search/); the settled
    recipe (each searched statement at its answer) checked, and the searches' results.

    The unmodified model is loaded lazily, only if the importance scores, the reference
    perplexities or a re-scored order are not cached, and released before the caller loads it.
    """
    from surgery.search.candidates import search_targets

    if not search_targets(checked.recipe):
        return checked, ()
    from surgery.search.engine import SearchSettings, run_searches

    loaded: dict = {}

    def graph_loader():
        if "graph" not in loaded:
            loaded["graph"] = _load(checked, progress, whole=False)
        return loaded["graph"]

    computed = None
    if checked.metrics_to_compute():
        from surgery.importance.compute import cached_importance, checked_device, compute_importance

        request = score_request(checked)
        computed = cached_importance(checked.spec, request, checked.index.num_layers)
        if computed is None:
            graph, tokenizer = graph_loader()
            with _calibration_text(checked):
                computed = compute_importance(graph, tokenizer, checked.spec, request, progress,
                                              device=checked_device(device))  # fmt: skip
    with _calibration_text(checked):
        recipe, results = run_searches(path, checked, model, computed, settings or SearchSettings(), progress,
                                       graph_loader)  # fmt: skip
    loaded.clear()
    gc.collect()
    with _collector_paused():
        settled = check(recipe, model_override=model)
    return settled, tuple(results)


def score_request(checked: CheckedRecipe) -> ScoreRequest:
    """The importance computation a checked recipe needs."""
    from surgery.importance.compute import ScoreRequest

    return ScoreRequest(checked.metrics_to_compute(), checked.calibration, data_dir=checked.base_dir)


def compile_recipe(
    path: str,
    model: str | None = None,
    verify: bool = True,
    progress: Progress = _quiet,
    device: str | None = None,
    search=None,
) -> Compiled:
    """Parse, check and plan a recipe file. Raises RecipeError.

    Loads the model only when a selector ranks by a computed metric whose scores are not
    cached yet (scored on `device`, one layer there at a time); everything else needs the
    config alone. A recipe with `as many as fit` runs its searches first (`search`: the
    executor settings), building and measuring candidates.
    """
    text, checked = check_recipe(path, model)
    checked, searches = settle_searches(path, checked, model, progress, search, device)
    computed = None
    if checked.metrics_to_compute():
        from surgery.importance.compute import cached_importance

        request = score_request(checked)
        computed = cached_importance(checked.spec, request, checked.index.num_layers)
        if computed is None:
            computed = _compute_with_model(checked, request, progress, device)
    return Compiled(text, checked, build_plan(checked, verify=verify, computed=computed), searches)


def resolve_expert_steps(compiled: Compiled, progress: Progress = _quiet, device: str | None = None) -> Compiled:
    """The plan with each merge step's groups and each prune step's kept experts filled in
    (their statistics counted on `device`, one layer there at a time).

    They come from calibration statistics on the model as the steps before leave it, so this
    loads the model and runs the graph passes (the splits, prunes and merges are quick; no
    export). A plan without merge or prune steps is returned as it is.
    """
    if not any(s.action in ("merge experts", "prune experts") and s.layers for s in compiled.plan.steps):
        return compiled
    import tempfile

    from surgery.importance.compute import checked_device

    stream = streams_weights(compiled.checked, False)
    graph, tokenizer = _load(compiled.checked, progress, whole=not stream)
    with tempfile.TemporaryDirectory(prefix="surgery-plan-") as scratch:
        plan, _ = run_graph_steps(compiled.plan, graph, _Calibration(compiled.checked, tokenizer), progress,
                                  (lambda: Path(scratch)) if stream else None, checked_device(device))  # fmt: skip
    return replace(compiled, plan=plan)


@contextmanager
def _calibration_text(checked: CheckedRecipe):
    """A calibration text found too short once tokenized is an error at the `calibrate` line.

    `check` counts the tokens exactly when the tokenizer loads without the weights; otherwise it
    can only bound them, and the count is made here.
    """
    from surgery.data import TextSourceError

    try:
        yield
    except TextSourceError as problem:
        span = checked.calibration_span or checked.model_span
        raise RecipeError([Diagnostic("error", str(problem), span, problem.hint)]) from None


def _compute_with_model(
    checked: CheckedRecipe, request: ScoreRequest, progress: Progress, device: str | None = None
) -> ImportanceFile:
    from surgery.importance.compute import checked_device, compute_importance

    device = checked_device(device)
    # Scores are computed layer-major: the weights stay in the checkpoint until a layer is scored.
    graph, tokenizer = _load(checked, progress, whole=False)
    with _calibration_text(checked):
        return compute_importance(graph, tokenizer, checked.spec, request, progress, device=device)


def weights_error(checked: CheckedRecipe, problem) -> RecipeError:
    """Every finding about the weights (a WeightsError), each at the `model` line."""
    return RecipeError([Diagnostic("error", message, checked.model_span, hint) for message, hint in problem.problems])


def _load(checked: CheckedRecipe, progress: Progress, whole: bool = True):
    """(graph, tokenizer): the model loaded, its nodes built from the architecture description,
    and that description checked against the model's own forward; problems at the `model` line.

    With `whole` False the weights of a safetensors checkpoint stay in their files
    and the graph loads them node by node (`DecoderGraph.materialized`)."""
    from surgery.architectures.conformance import DescriptionMismatch, checked_graph
    from surgery.models.loading import ModelSpecError, load_model
    from surgery.models.weights import WeightsError

    progress(f"loading {checked.spec.text}")
    try:
        hf_model, tokenizer, weights = load_model(checked.spec, progress, lazy=True)
        graph = checked_graph(hf_model, checked.index, weights)
        if whole:
            graph.materialize_all()
        return graph, tokenizer
    except DescriptionMismatch as problem:
        raise RecipeError([Diagnostic("error", str(problem), checked.model_span, problem.hint)]) from problem
    except WeightsError as problem:
        raise weights_error(checked, problem) from problem
    except ModelSpecError as problem:
        raise RecipeError([Diagnostic("error", str(problem), checked.model_span, problem.hint)]) from problem


def apply(
    path: str,
    output: str,
    model: str | None = None,
    force: bool = False,
    run_verification: bool = True,
    threads: int | None = None,
    progress: Progress = _quiet,
    provider: str = "cpu",
    device: str | None = None,
    recipe_text: str | None = None,
    search=None,
) -> ApplyResult:
    """Run a recipe end to end and write the output folder; verification runs on `provider`;
    importance scoring, expert statistics, the PyTorch side of the layer-major verification and
    `verify perplexity`'s reference on `device` (one layer there at a time).

    `recipe_text` is applied as if it were the file at `path` (a search's candidates).
    `as many as fit` statements are searched first (`search`: the executor settings); the
    output then holds search.json and, with matplotlib, search.png.
    """
    # torch, onnx and onnxruntime load here, not at import: `check` and `plan` never need them.

    from surgery.export.decoder import export_decoder
    from surgery.importance.compute import checked_device, compute_importance
    from surgery.models.weights import WeightsError
    from surgery.passes.quantize import ACCURACY_LEVELS
    from surgery.report import build_report, folder_bytes, structure, write_report
    from surgery.verify import compare, trace_reference

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    total_start = clock

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    text, checked = check_recipe(path, model, recipe_text)
    providers = _verification_providers(checked, provider, run_verification)
    device = checked_device(device)
    folder = OutputFolder(output, force, [path, *checked.input_paths()], progress)
    lap("parse_check")
    try:
        checked, searches = settle_searches(path, checked, model, progress, search, device)
    except BaseException:
        folder.discard()
        raise
    if searches:
        lap("search")
    try:
        stream = streams_weights(checked, run_verification)
        graph, tokenizer = _load(checked, progress, whole=not stream)
        before = structure(graph)
        lap("load")

        sections: dict = {}
        if folder.removed_leftovers:  # what killed earlier runs to this output left, now removed
            sections["removed_leftovers"] = [path.name for path in folder.removed_leftovers]
        computed = None
        if checked.metrics_to_compute():
            # On the unmodified model, before any pass: scores mean the original layers.
            with _calibration_text(checked):
                computed = compute_importance(
                    graph, tokenizer, checked.spec, score_request(checked), progress, device=device
                )
            sections["importance"] = computed.to_json()
            lap("importance")
        plan = build_plan(checked, verify=run_verification, computed=computed)
        reference_perplexity = _reference_perplexity(checked, graph, tokenizer, progress, device)
        if reference_perplexity is not None:
            lap("reference_perplexity")

        calibration = _Calibration(checked, tokenizer)
        # A streamed apply rewrites layers one at a time, writing them aside; a whole one in memory.
        plan, passes = run_graph_steps(plan, graph, calibration, progress, folder.scratch if stream else None,
                                       device)  # fmt: skip
        after = structure(graph)
        tied_head = graph.tied_head
        lap("passes")

        quantization = plan.quantization()
        # A quantized head or embedding needs the head's weight as an initializer of its own
        # (the quantized embedding then shares it back when both have the same width).
        options = replace(plan.export, untie_head="lm_head" in quantization or EMBEDDING in quantization)
        linears = {target: config for target, config in quantization.items() if target != EMBEDDING}
        calibrated = _gptq(graph, linears, calibration, progress)
        if calibrated:
            lap("gptq")
        if stream and linears:
            # Quantized as they are written: no float copy of the model is written or read back.
            assignment = tuple((linear, c["bits"], c["block"], c["symmetric"]) for linear, c in linears.items())
            options = replace(options, quantize_linears=assignment, accuracy_level=ACCURACY_LEVELS[options.target])
        padded = verification_pads_prompts(plan.export.target)
        # The graph is final: PyTorch's side of the verification only reads it, so it runs
        # while the exporter writes the weights (torch and file writes both release the GIL).
        # Streamed, verification runs after the export, layer-major (surgery.verify_layerwise).
        with ThreadPoolExecutor(max_workers=1) as background:
            tracing = (
                background.submit(
                    trace_reference, graph, tokenizer, plan.export.kv_cache, VERIFY_DECODE_STEPS, padded=padded
                )
                if run_verification and not stream
                else None
            )
            kv = "with" if plan.export.kv_cache else "without"
            quantizing = (
                f", quantizing {len(options.quantize_linears)} linear layer(s) to MatMulNBits as they are written"
                if options.quantize_linears
                else ""
            )
            progress(f"exporting ONNX (opset {plan.export.opset}, {kv} KV cache){quantizing}")
            try:
                export = export_decoder(graph, str(folder.path), options, calibrated if stream else None)
            except WeightsError as problem:  # a lazily loaded tensor that is damaged
                raise weights_error(checked, problem) from problem
            tokenizer.save_pretrained(str(folder.path))
            sections["onnxruntime_genai"] = _write_genai_config(graph, export, plan.export, tokenizer, str(folder.path))
            (folder.path / "recipe.surg").write_text(text, encoding="utf-8")
            if searches:
                sections["search"] = _write_search(searches, checked, str(folder.path))
            lap("export")
            trace = tracing.result() if tracing else None

        verification = moved = None
        precision = plan.export.precision
        if run_verification and stream:
            try:
                verification, moved = _verify_layerwise(graph, tokenizer, options, str(folder.path), threads,
                                                        providers, progress, device)  # fmt: skip
            except WeightsError as problem:
                raise weights_error(checked, problem) from problem
            lap("verify")
        elif trace is not None:
            fp32_trace = None
            if precision != "fp32":
                # PyTorch again, in the export's element type; the fp32 trace stays for KL / top-1.
                progress(f"tracing PyTorch in {precision}")
                fp32_trace = trace
                graph.to_dtype(precision_record(precision).torch_dtype())
                trace = trace_reference(graph, tokenizer, plan.export.kv_cache, VERIFY_DECODE_STEPS, padded=padded)
            progress("verifying against PyTorch (prefill + decode)" + (" before quantization" if quantization else ""))
            # The PyTorch weights are not needed past this point; free them before onnxruntime
            # maps the exported ones, so the two copies never add up.
            del graph
            gc.collect()
            tolerance = precision_record(precision).tolerance
            verification = compare(trace, str(folder.path), tolerance, threads, precision, fp32_trace, providers)
            lap("verify")
        if quantization:
            quantized = _quantize(plan, export, str(folder.path), passes, progress, tied_head, options.quantize_linears,
                                  calibrated)  # fmt: skip
            sections["quantization"] = quantized
            if trace is not None:
                # Informational: how far quantization moved the logits (no tolerance applies).
                moved = compare(trace, str(folder.path), float("inf"), threads, precision, providers=providers)
            if moved is not None:
                quantized["against_pytorch_fp32"] = {
                    "reference_precision": precision,  # PyTorch's element type (the key predates fp16)
                    "max_abs_logit_diff": moved.max_abs_logit_diff,
                    "greedy_tokens_compared": moved.greedy_tokens_compared,
                    "greedy_tokens_mismatched": moved.greedy_tokens_mismatched,
                }
            lap("quantize")
        perplexity_passed = None
        if reference_perplexity is not None:
            sections["perplexity"] = _perplexity_check(
                checked, reference_perplexity, str(folder.path), threads, progress, provider
            )
            perplexity_passed = sections["perplexity"]["passed"]
            lap("perplexity")
        timings["total"] = time.perf_counter() - total_start
        if quantization:
            export = replace(export, op_counts=sections["quantization"].pop("op_counts"))
        report = build_report(
            recipe_text=text,
            plan=plan,
            before=before,
            after={**after, "parameters": export.parameter_count},
            passes=passes,
            export=export,
            files=folder_bytes(str(folder.path)),
            verification=verification,
            timings=timings,
            warnings=plan.warnings,
            sections=sections,
        )
        write_report(str(folder.path), report)
        target = folder.commit()
    except BaseException:
        folder.discard()
        raise
    return ApplyResult(target, report, verification, perplexity_passed, searches)


def _write_search(searches: tuple, checked: CheckedRecipe, folder: str) -> dict:
    """search.json (every candidate of every search) and search.png (quality against size or
    latency, when matplotlib is installed); the report's summary of them."""
    import json

    from surgery.search.engine import search_json
    from surgery.search.plot import plot_searches
    from surgery.syntax import unparse

    content = search_json(list(searches), unparse(checked.recipe))
    with open(os.path.join(folder, "search.json"), "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
    plotted = plot_searches(list(searches), os.path.join(folder, "search.png"))
    return {
        "file": "search.json",
        "plot": "search.png" if plotted is None else None,
        "plot_skipped": plotted,
        "answers": [
            {
                "line": s.target.line,
                "count": s.answer.count,
                "statement": s.settled_text,
                "candidates_measured": len(s.candidates),
                "candidates_built": s.built(),
                "counts_possible": s.maximum + 1,
            }
            for s in searches
        ],  # fmt: skip
    }


def _verification_providers(checked: CheckedRecipe, provider: str, run_verification: bool) -> list[str]:
    """The providers verification runs on; refused before anything heavy when they cannot run the export."""
    from surgery.diagnostics import HintedError
    from surgery.runtime import execution_providers

    providers = execution_providers(provider)
    if run_verification and not checked.export.element.runs_on(provider):
        raise HintedError(
            f"a {checked.export.precision} export cannot be verified on the {provider.upper()}: "
            f"{checked.export.element.why_not}",
            "verify on the GPU with --provider cuda (onnxruntime-gpu), or skip with --no-verify",
        )
    return providers


def _write_genai_config(graph, export, options, tokenizer, folder: str) -> dict:
    """genai_config.json beside the model, so onnxruntime-genai loads the folder as it is."""
    from surgery.export.genai import genai_config, write_genai_config

    try:
        # The CUDA target's outputs ask genai for its CUDA provider; the CPU's for none (CPU).
        providers = [{"cuda": {}}] if options.target == "cuda" else []
        content = genai_config(
            graph,
            export.context_length,
            options.kv_cache,
            options.position_ids,
            tokenizer,
            providers,
            share_buffer=options.target == "cuda",
        )
    except ValueError as reason:
        return {"written": False, "reason": str(reason)}
    write_genai_config(folder, content)
    return {"written": True, "config": "genai_config.json", "model_type": content["model"]["type"]}


class _Calibration:
    """The recipe's calibration tokens, tokenized on first use and kept for later steps."""

    def __init__(self, checked: CheckedRecipe, tokenizer):
        self.checked, self.spec, self.tokenizer = checked, checked.calibration, tokenizer
        self._tokens = None

    def tokens(self):
        """(samples, length) token ids."""
        if self._tokens is None:
            from surgery.calibration import calibration_tokens
            from surgery.data import resolve_text

            with _calibration_text(self.checked):
                text = resolve_text(self.spec.data, self.checked.base_dir)
                self._tokens = calibration_tokens(self.tokenizer, self.spec, text)
        return self._tokens


def run_graph_steps(
    plan: Plan,
    graph,
    calibration: _Calibration,
    progress: Progress,
    scratch: Callable[[], Path] | None = None,
    device: str | None = None,
) -> tuple[Plan, list[dict]]:
    """Run the plan's graph passes in order; returns the plan with the expert groups and kept
    experts that merge and prune steps resolved from calibration statistics, and the pass records.

    `scratch` gives the folder where a lazily loaded graph's rewritten layers are written
    (`run_on_graph`); it is asked for only when a pass rewrites weights. `device`: where the
    expert statistics run, one layer at a time.
    """
    from surgery.passes import PASSES
    from surgery.report import pass_record

    passes = []
    resolved_steps = []
    for step in plan.steps:
        if step.phase != "graph" or not step.layers:
            resolved_steps.append(step)
            continue
        extra = {}
        if step.action == "prune experts":
            graph_pass, extra = _prune_by_frequency(graph, step, calibration, progress, device)
            resolution = {"resolved_kept": {str(layer): list(kept) for layer, kept in graph_pass.kept}}
        elif step.action == "merge experts":
            graph_pass, extra = _merge_by_statistics(graph, step, calibration, progress, device)
            resolution = {"resolved_groups": extra["groups"]}
            if graph_pass.rank is not None:
                resolution["resolved_rank"] = graph_pass.rank
        else:
            graph_pass, resolution = PASSES[step.action].from_step(step), {}
        resolved_steps.append(replace(step, parameters={**step.parameters, **resolution}))
        result = run_on_graph(graph_pass, graph, scratch, progress)
        progress(f"{step.action}: {result.summary}")
        passes.append({**pass_record(graph_pass, result, step.source), **extra})
    return replace(plan, steps=tuple(resolved_steps)), passes


def run_on_graph(graph_pass, graph, scratch: Callable[[], Path] | None, progress: Progress = _quiet):
    """`run_pass`, except on a lazily loaded graph for a pass that rewrites weights (one with
    `layer_passes`: prune and merge experts). There it runs a layer at a time: the layer is
    loaded, its one-layer pass applied, the new weights written to a file in `scratch()` and
    released (`DecoderGraph.spill_rewritten`); later steps, the exporter and verification load
    them from there like the checkpoint's. The contract is checked on the whole graph before
    and after, from shapes. So peak memory is a layer's, whatever the model's size.
    """
    from surgery.passes import PassResult, run_pass

    if graph.weights is None or not hasattr(graph_pass, "layer_passes") or scratch is None:
        return run_pass(graph_pass, graph)

    def layer_by_layer(graph) -> PassResult:
        folder, written, layers = scratch(), 0, graph_pass.layer_passes()
        for index, one_layer in layers:
            layer = graph.layer(index)
            with graph.materialized(*layer.modules()):
                one_layer.apply(graph)
                written += graph.spill_rewritten(layer, folder)
        progress(f"{graph_pass.name}: rewrote {len(layers)} layer(s) one at a time "
                 f"({written / 1e6:.1f} MB written aside)")  # fmt: skip
        return PassResult(True, graph_pass.summary())

    return run_pass(graph_pass, graph, layer_by_layer)


def _rounded(frequencies: dict[int, list[float]]) -> dict[str, list[float]]:
    return {str(layer): [round(f, 6) for f in values] for layer, values in frequencies.items()}


def _merge_by_statistics(graph, step, calibration: _Calibration, progress: Progress, device: str | None = None):
    """The merge pass for a step: usage and output statistics on the calibration data, then groups."""
    from surgery.expert_rules import merge_rank
    from surgery.experts import expert_statistics, full_rank, group_by_outputs, group_by_router
    from surgery.passes import MergeExperts

    p = step.parameters
    counted = "expert use and outputs" if p["grouping"] == "output" else "expert use"
    progress(f"counting {counted} on {calibration.spec.describe()}")
    frequencies, outputs = expert_statistics(
        graph, step.layers, calibration.tokens(), outputs=p["grouping"] == "output", device=device
    )
    rank = p.get("rank")
    if "rank_percent" in p:  # every layer's experts have one shape (one model, or one split)
        experts = graph.layer(step.layers[0]).mlp.experts
        rank = merge_rank(full_rank(experts.gate_up_proj, experts.down_proj), None, p["rank_percent"])
    merges = []
    for layer in step.layers:
        freq = frequencies[layer]
        if p["grouping"] == "output":
            groups = group_by_outputs(outputs[layer], p["groups"])
        else:
            router = graph.layer(layer).mlp.gate
            with graph.materialized(router):  # a lazily loaded router is read for this only
                groups = group_by_router(router.weight.detach().float().numpy(), freq, p["groups"])
        # The most used member leads: the others' neurons are aligned to it before averaging.
        groups = [sorted(members, key=lambda e: (-freq[e], e)) for members in groups]
        weights = []
        for members in groups:
            total = sum(freq[e] for e in members)
            uniform = p["weighting"] == "uniform" or total == 0
            weights.append(tuple(1 / len(members) if uniform else freq[e] / total for e in members))
        merges.append((layer, tuple(tuple(g) for g in groups), tuple(weights)))
    record = {
        "frequencies": _rounded(frequencies),
        "groups": {str(layer): [list(g) for g in groups] for layer, groups, _ in merges},
    }
    return MergeExperts(merges=tuple(merges), rank=rank), record


def _prune_by_frequency(graph, step, calibration: _Calibration, progress: Progress, device: str | None = None):
    """The prune pass for a step: count expert use on the calibration data, keep the most used."""
    from surgery.experts import expert_frequencies, most_used
    from surgery.passes import PruneExperts

    progress(f"counting expert use on {calibration.spec.describe()}")
    frequencies = expert_frequencies(graph, step.layers, calibration.tokens(), device)
    kept = tuple((layer, most_used(frequencies[layer], step.parameters["keep"])) for layer in step.layers)
    return PruneExperts(kept=kept), {"frequencies": _rounded(frequencies)}


def _reference_perplexity(checked: CheckedRecipe, graph, tokenizer, progress: Progress, device: str | None = None):
    """The original model's perplexity for `verify perplexity`, computed before any pass, its
    layers run one at a time on `device` (default the CPU)."""
    if checked.perplexity is None:
        return None
    from surgery.data import resolve_text
    from surgery.evaluate import eval_tokens, graph_perplexity

    request = checked.perplexity
    tokens = eval_tokens(tokenizer, resolve_text(request.data, checked.base_dir), request.tokens, request.window)
    if tokens.scored() < MIN_PERPLEXITY_TOKENS - 1:  # `check` bounded the count without the tokenizer
        raise RecipeError([Diagnostic("error", f"'{request.data}' has too few tokens for a perplexity", request.span)])
    where = f"PyTorch, {device}" if device else "PyTorch"
    progress(f"perplexity of the original model on {tokens.scored()} tokens of {tokens.text.name} ({where})")
    return tokens, graph_perplexity(graph, tokens, device)


def _perplexity_check(
    checked: CheckedRecipe, reference, folder: str, threads: int | None, progress: Progress, provider: str = "cpu"
) -> dict:
    """`verify perplexity`: the output's perplexity in onnxruntime (on `provider`, as the rest of
    verification) against the original model's, and whether the increase is within the bound."""
    from surgery.evaluate import onnx_logits, perplexity

    tokens, before = reference
    progress(f"perplexity of the output (onnxruntime, {provider})")
    after = perplexity(onnx_logits(folder, threads, provider), tokens)
    increase = after.perplexity / before.perplexity - 1
    allowed = checked.perplexity.max_increase / 100
    return {
        "text": tokens.text.to_json(),
        "protocol": f"chunked: non-overlapping windows of {tokens.window} tokens, first token of each unscored",
        "original_pytorch": before.to_json(),
        "output_onnxruntime": after.to_json(),
        "increase": increase,
        "max_increase": allowed,
        "passed": increase <= allowed,
    }


def _gptq(graph, linears: dict[str, dict], calibration: _Calibration, progress: Progress) -> dict:
    """GPTQ blocks for the linears marked `gptq`, calibrated on the recipe's calibration tokens
    (surgery.calibrated_quantization); empty when none is."""
    settings = {linear: (c["bits"], c["block"], c["symmetric"]) for linear, c in linears.items() if c.get("gptq")}
    if not settings:
        return {}
    from surgery.calibrated_quantization import calibrated_blocks

    progress(f"GPTQ: rounding {len(settings)} linear layer(s) against {calibration.spec.describe()}")
    return calibrated_blocks(graph, settings, calibration.tokens(), progress)


def _quantize(plan: Plan, export, folder: str, passes: list, progress: Progress, tied_head: bool,
              written: tuple = (), calibrated: dict | None = None) -> dict:  # fmt: skip
    """Quantize the exported model's linears (unless the exporter quantized them as it wrote them:
    `written`) and embedding, and replace its files atomically; the report's quantization section.
    `calibrated`: GPTQ blocks by linear, written over the round-to-nearest ones of the quantize
    pass (same layout and size), before the embedding pass shares a tied head's table.

    Linears quantized while written are held to the quantize pass's own contract (`ensures`)
    on the written graph, read without its weights.
    """
    from collections import Counter

    import onnx

    from surgery.passes import PassContractError, PassResult, Quantize, QuantizeEmbedding, run_pass
    from surgery.passes.quantize import ACCURACY_LEVELS
    from surgery.quantization import bits_summary, replace_blocks
    from surgery.report import folder_bytes, pass_record

    files_before = folder_bytes(folder)
    embedding = plan.quantization().get(EMBEDDING)
    model = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=not written)
    linears = {target: config for target, config in plan.quantization().items() if target != EMBEDDING}
    steps = [step for step in plan.steps if step.action == "quantize"]
    if linears:
        assignment = tuple(
            (export.linears[linear], config["bits"], config["block"], config["symmetric"])
            for linear, config in linears.items()
        )
        # int8 activations on CPU (accuracy_level 4, the fast path there); float compute on CUDA.
        quantize = Quantize(assignment=assignment, accuracy_level=ACCURACY_LEVELS[plan.export.target])
        if written:
            problems = quantize.ensures(model)
            if problems:
                raise PassContractError(quantize.name, "ensures", problems)
            result = PassResult(True, quantize.summary() + ", while writing")
        else:
            progress(f"quantizing {len(assignment)} linear layer(s) to MatMulNBits")
            result = run_pass(quantize, model)
            replace_blocks(model, {export.linears[linear]: b for linear, b in (calibrated or {}).items()})
        progress(f"quantize: {result.summary}")
        linear_steps = [step for step in steps if step.targets != (EMBEDDING,)]
        record = pass_record(quantize, result, linear_steps[0].source if linear_steps else None)
        record["parameters"] = {"linears": linears}
        passes.append(record)
    if embedding:
        quantize_embedding = QuantizeEmbedding(
            bits=embedding["bits"], block=embedding["block"], symmetric=embedding["symmetric"], tied_head=tied_head
        )
        result = run_pass(quantize_embedding, model)
        progress(f"quantize embedding: {result.summary}")
        source = next(step.source for step in reversed(steps) if step.targets == (EMBEDDING,))
        passes.append(pass_record(quantize_embedding, result, source))
    summary = bits_summary(model)
    if not written:
        # Written next to the old files, then swapped in: a crash leaves the fp32 model intact.
        staging = os.path.join(folder, ".quantized")
        os.makedirs(staging)
        onnx.save(
            model,
            os.path.join(staging, "model.onnx"),
            save_as_external_data=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
        for name in ("model.onnx.data", "model.onnx"):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
        os.rmdir(staging)
    files_after = folder_bytes(folder)
    if written:
        # No float model was written: "before" is what its data file would have held.
        data = files_after["model.onnx.data"] + _float_excess(model, plan.export.precision)
        files_before = {**files_after, "model.onnx.data": data}
    return {
        **summary,
        "quantized_while_writing": bool(written),
        "files_before": files_before,
        "files_after": files_after,
        "bytes_before": sum(files_before.values()),
        "bytes_after": sum(files_after.values()),
        "op_counts": dict(Counter(node.op_type for node in model.graph.node)),
    }


def _float_excess(model, precision: str) -> int:
    """Bytes the quantized linears would take in the float element type beyond what they take."""
    from surgery.quantization import quantized_linears

    itemsize = precision_record(precision).itemsize
    return sum(q.parameters * itemsize - q.storage_bytes for q in quantized_linears(model))


def _verify_layerwise(graph, tokenizer, options, folder: str, threads, providers, progress: Progress,
                      device: str | None = None):  # fmt: skip
    """(verification, how far quantization moved the logits or None), teacher-forced and
    layer-major (surgery.verify_layerwise): PyTorch holds a layer at a time, run on `device`.

    A model quantized while written is verified exactly through its float-compute twin against
    PyTorch with the quantized weights; the model as written is then compared with the original
    weights for information.
    """
    from surgery.verify import compare
    from surgery.verify_layerwise import float_compute_twin, teacher_forced_traces, written_weights

    tolerance = precision_record(FP32.name).tolerance
    model = os.path.join(folder, "model.onnx")
    layerwise = {"reference": "teacher-forced, layer by layer"}
    padded = verification_pads_prompts(options.target)

    def traces(runs):
        return teacher_forced_traces(graph, tokenizer, runs, VERIFY_DECODE_STEPS, options.kv_cache, padded, threads,
                                     providers, device=device)  # fmt: skip

    if not options.quantize_linears:
        progress("verifying against PyTorch (teacher-forced, layer by layer)")
        ((trace, run),) = traces([(model, None)])
        return replace(compare(trace, model, tolerance, recorded=run), **layerwise), None
    progress("verifying against PyTorch with the quantized weights (float compute; teacher-forced, layer by layer)")
    exact = float_compute_twin(folder) if options.accuracy_level else model
    try:
        # The run with the written weights comes last: it overwrites loaded weights in place.
        original, quantized = traces([(model, None), (exact, written_weights(graph, model))])
        verification = compare(quantized[0], exact, tolerance, recorded=quantized[1])
        verification = replace(verification, **layerwise, quantized_weights=True)
    finally:
        if exact != model:
            os.remove(exact)
    return verification, compare(original[0], model, float("inf"), recorded=original[1])


def default_output(recipe_path: str) -> str:
    """`out/<recipe name>` under the working directory."""
    return os.path.join("out", Path(recipe_path).stem)
