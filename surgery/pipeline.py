"""The whole compiler in order: parse -> check -> search -> plan -> execute -> report.

Everything else hangs off this module. `check_recipe` is the weight-free part (`surgery check`);
`compile_recipe` adds the plan, computing importance scores first when a selector ranks by a
computed metric (`surgery plan`; results are cached); `apply` runs the plan under the executor
(surgery/executor/) and writes the report. This module sits above every other: the search
(surgery/search/) is handed what it needs from here and imports nothing of it.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.backend.output import OutputFolder
from surgery.diagnostics import Diagnostic, RecipeError
from surgery.executor.run import Clock, Progress, Run, Settings, quiet
from surgery.files import RECIPE_LIMIT, InputFileError, read_source
from surgery.front.check import check
from surgery.front.checked import CheckedRecipe
from surgery.front.parser import parse_source
from surgery.front.plan import Plan
from surgery.front.planner import build_plan
from surgery.front.recipe import Recipe
from surgery.source import Source

if TYPE_CHECKING:
    from surgery.backend.verify import Verification



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


def check_recipe(path: str, model: str | None = None, recipe: Recipe | None = None) -> tuple[str, CheckedRecipe]:
    """Parse and check a recipe file against its model's config; (its text, the checked recipe).
    Raises RecipeError.

    With `recipe`, that syntax tree is checked as the recipe at `path` (relative paths start at
    its folder), and its text is its canonical one: how a search's candidates are checked.
    """
    with _collector_paused():
        if recipe is not None:
            from surgery.front.syntax import unparse

            return unparse(recipe), check(recipe, model_override=model)
        source = read_recipe(path)
        return source.text, check(parse_source(source), model_override=model)


def settle_searches(path: str, checked: CheckedRecipe, model: str | None, progress: Progress,
                    settings=None, device: str | None = None) -> tuple[CheckedRecipe, tuple]:  # fmt: skip
    """Run every `as many as fit` search of a checked recipe (surgery/search/); the settled
    recipe (each searched statement at its answer) checked, and the searches' results.

    The unmodified model is loaded lazily, only if the importance scores, the reference
    perplexities or a re-scored order are not cached, and released before the caller loads it.
    Candidates are built by `apply` (handed to the search: it imports nothing from here).
    """
    from surgery.search.candidates import search_targets

    if not search_targets(checked.recipe):
        return checked, ()
    from surgery.search.engine import SearchSettings, run_searches

    scoring = Run(checked, "", Settings(device=device), progress)

    def graph_loader():
        if scoring.graph is None:
            scoring.load()
        return scoring.graph, scoring.tokenizer

    computed = scoring.scores() if checked.metrics_to_compute() else None
    with scoring.calibration_text():
        recipe, results = run_searches(path, checked, model, computed, settings or SearchSettings(), progress,
                                       graph_loader, build=apply)  # fmt: skip
    scoring.release_graph()
    with _collector_paused():
        settled = check(recipe, model_override=model)
    return settled, tuple(results)


def planned_warnings(checked: CheckedRecipe) -> tuple | None:
    """Every warning `surgery plan` will give, when the plan needs nothing but the config (no
    selector ranks by computed scores, no search): `check` then says all of them. None when
    the plan needs the model (importance scores, searches)."""
    from surgery.front.planner import build_plan
    from surgery.search.candidates import search_targets

    if checked.metrics_to_compute() or search_targets(checked.recipe):
        return None
    return tuple(build_plan(checked, verify=False).warnings)


def compile_recipe(
    path: str,
    model: str | None = None,
    verify: bool = True,
    progress: Progress = quiet,
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
        from surgery.importance.compute import ScoreRequest, cached_importance

        request = ScoreRequest(checked.metrics_to_compute(), checked.calibration, data_dir=checked.base_dir)
        computed = cached_importance(checked.spec, request, checked.index.num_layers)
        if computed is None:
            computed = Run(checked, text, Settings(device=device), progress).scores()
    return Compiled(text, checked, build_plan(checked, verify=verify, computed=computed), searches)


def resolve_expert_steps(compiled: Compiled, progress: Progress = quiet, device: str | None = None) -> Compiled:
    """The plan with each merge step's groups and each prune step's kept experts filled in
    (their statistics counted on `device`, one layer there at a time).

    They come from calibration statistics on the model as the steps before leave it, so this
    loads the model and runs the plan's graph steps under the executor (the splits, prunes and
    merges are quick; no export). A plan without merge or prune steps is returned as it is.
    """
    if not any(s.action in ("merge experts", "prune experts") and s.layers for s in compiled.plan.steps):
        return compiled
    import tempfile

    from surgery.executor.execute import execute
    from surgery.importance.compute import checked_device

    with tempfile.TemporaryDirectory(prefix="surgery-plan-") as scratch:
        run = Run(compiled.checked, compiled.text, Settings(device=checked_device(device)), progress,
                  scratch=lambda: Path(scratch))  # fmt: skip
        run.load()
        plan = execute(compiled.plan, run, phases=("graph",))
    return replace(compiled, plan=plan)


def apply(
    path: str,
    output: str,
    model: str | None = None,
    force: bool = False,
    run_verification: bool = True,
    threads: int | None = None,
    progress: Progress = quiet,
    provider: str = "cpu",
    device: str | None = None,
    recipe: Recipe | None = None,
    search=None,
) -> ApplyResult:
    """Run a recipe end to end and write the output folder; verification runs on `provider`;
    importance scoring, expert statistics, the PyTorch side of the layer-major verification and
    `verify perplexity`'s reference on `device` (one layer there at a time).

    `recipe` is applied as if it were the file at `path` (a search's candidates).
    `as many as fit` statements are searched first (`search`: the executor settings); the
    output then holds search.json and, with matplotlib, search.png.
    """
    from surgery.backend.report import build_report, folder_bytes, structure, write_report
    from surgery.backend.verdict import seal
    from surgery.executor.execute import execute
    from surgery.importance.compute import checked_device

    clock = Clock()
    text, checked = check_recipe(path, model, recipe)
    providers = _verification_providers(checked, provider, run_verification)
    device = checked_device(device)
    folder = OutputFolder(output, force, [path, *checked.input_paths()], progress)
    clock.lap("parse_check")
    try:
        checked, searches = settle_searches(path, checked, model, progress, search, device)
        if searches:
            clock.lap("search")
        run = Run(checked, text, Settings(run_verification, threads, provider, providers, device), progress, folder,
                  clock)  # fmt: skip
        run.searches = searches
        run.build = lambda other, out: apply(path, out, model, False, run_verification, threads, progress, provider,
                                             device, recipe=other)  # fmt: skip
        run.load()
        run.before = structure(run.graph)
        clock.lap("load")
        if folder.removed_leftovers:  # what killed earlier runs to this output left, now removed
            run.sections["removed_leftovers"] = [path.name for path in folder.removed_leftovers]
        computed = None
        if checked.metrics_to_compute():
            # On the unmodified model, before any pass: scores mean the original layers.
            computed = run.scores()
            clock.lap("importance")
        plan = build_plan(checked, verify=run_verification, computed=computed)
        try:
            plan = execute(plan, run)
        finally:
            run.close()
        if searches:
            run.sections["search"] = _write_search(searches, checked, str(folder.path))
            if run.sections["search"]["plot_skipped"]:  # the README promises the plot: say why it is missing
                progress(f"search.png not drawn: {run.sections['search']['plot_skipped']}")
        export = run.export_result
        if "quantization" in run.sections:
            export = replace(export, op_counts=run.sections["quantization"].pop("op_counts"))
        report = build_report(
            recipe_text=text,
            plan=plan,
            before=run.before,
            after={**run.after, "parameters": export.parameter_count},
            passes=run.passes,
            export=export,
            files=folder_bytes(str(folder.path)),
            verification=run.verification,
            timings=clock.total(),
            warnings=plan.warnings,
            sections=run.sections,
        )
        if run_verification and plan.export.target != provider:
            report["verification"]["provider"] = provider
            report["warnings"].append(_verified_elsewhere(plan.export.target, provider))
        seal(folder.path, report)  # a failed check: said in the report, the genai config held back
        write_report(str(folder.path), report)
        target = folder.commit()
    except BaseException:
        folder.discard()
        raise
    return ApplyResult(target, report, run.verification, run.perplexity_passed, searches)


def _verified_elsewhere(target: str, provider: str) -> str:
    """What a user must know about an output verified on another provider than it was built for."""
    return (
        f"warning: exported for {target} but verified on onnxruntime's {provider.upper()} provider: the graph did "
        f"not run {'on a GPU' if target == 'cuda' else 'on the CPU'} here. Verify it where it will run "
        f"(`surgery eval OUT --provider {target}`, or `surgery apply --provider {target}`); its genai_config.json "
        "asks onnxruntime-genai for "
        f"{'its CUDA provider (onnxruntime-genai-cuda on a GPU machine)' if target == 'cuda' else 'the CPU'}"
    )


def _verification_providers(checked: CheckedRecipe, provider: str, run_verification: bool) -> list[str]:
    """The providers verification runs on; refused before anything heavy when they cannot run the export."""
    from surgery.backend.runtime import execution_providers
    from surgery.diagnostics import HintedError

    providers = execution_providers(provider)
    if run_verification and not checked.export.element.runs_on(provider):
        raise HintedError(
            f"a {checked.export.precision} export cannot be verified on the {provider.upper()}: "
            f"{checked.export.element.why_not}",
            "verify on the GPU with --provider cuda (onnxruntime-gpu), or skip with --no-verify",
        )
    return providers


def _write_search(searches: tuple, checked, folder: str) -> dict:
    """search.json (every candidate of every search) and search.png (quality against size or
    latency, when matplotlib is installed); the report's summary of them."""
    import json

    from surgery.front.syntax import unparse
    from surgery.search.plot import plot_searches
    from surgery.search.results import search_json

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


def default_output(recipe_path: str) -> str:
    """`out/<recipe name>` under the working directory."""
    return os.path.join("out", Path(recipe_path).stem)
