"""The whole compiler in order: parse -> check -> plan -> passes -> export -> verify -> report.

Everything else hangs off this module. `compile_recipe` does the cheap, weight-free part
(what `surgery check` and `surgery plan` run); `apply` does the rest.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.check import CheckedRecipe, check
from surgery.diagnostics import Diagnostic, RecipeError
from surgery.output import OutputFolder
from surgery.parser import parse
from surgery.plan import VERIFY_DECODE_STEPS, VERIFY_TOLERANCE, Plan, build_plan

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class ApplyResult:
    """Where the output went and what verification found."""

    output: Path
    report: dict
    verification: Verification | None


def read_recipe(path: str) -> str:
    """The recipe text (UTF-8)."""
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def compile_recipe(path: str, model: str | None = None, verify: bool = True) -> Compiled:
    """Parse, check and plan a recipe file, without loading weights. Raises RecipeError."""
    text = read_recipe(path)
    recipe = parse(text, name=path)
    checked = check(recipe, model_override=model)
    return Compiled(text, checked, build_plan(checked, verify=verify))


def apply(
    path: str,
    output: str,
    model: str | None = None,
    force: bool = False,
    run_verification: bool = True,
    threads: int | None = None,
    progress: Progress = _quiet,
) -> ApplyResult:
    """Run a recipe end to end and write the output folder."""
    # torch, onnx and onnxruntime load here, not at import: `check` and `plan` never need them.
    from surgery.export.decoder import export_decoder
    from surgery.models.graph import DecoderGraph
    from surgery.models.loading import ModelSpecError, load_model
    from surgery.passes import PASSES, run_pass
    from surgery.report import build_report, folder_bytes, pass_record, structure, write_report
    from surgery.verify import compare, trace_reference

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    total_start = clock

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    compiled = compile_recipe(path, model, verify=run_verification)
    checked, plan = compiled.checked, compiled.plan
    protected = [path] + ([checked.spec.location] if checked.spec.kind in ("folder", "gguf") else [])
    folder = OutputFolder(output, force, protected)
    lap("parse_check_plan")
    try:
        progress(f"loading {checked.spec.text}")
        try:
            hf_model, tokenizer = load_model(checked.spec, progress)
        except ModelSpecError as problem:
            raise RecipeError([Diagnostic("error", str(problem), checked.model_span, problem.hint)]) from problem
        graph = DecoderGraph(hf_model, checked.index)
        before = structure(graph)
        lap("load")

        passes = []
        for step in plan.graph_steps():
            if not step.layers:
                continue
            graph_pass = PASSES[step.action](layers=step.layers)
            result = run_pass(graph_pass, graph)
            progress(f"{step.action}: {result.summary}")
            passes.append(pass_record(graph_pass, result, step.source))
        after = structure(graph)
        lap("passes")

        # The graph is final: PyTorch's side of the verification only reads it, so it runs
        # while the exporter writes the weights (torch and file writes both release the GIL).
        with ThreadPoolExecutor(max_workers=1) as background:
            tracing = (
                background.submit(trace_reference, graph, tokenizer, plan.export.kv_cache, VERIFY_DECODE_STEPS)
                if run_verification
                else None
            )
            kv = "with" if plan.export.kv_cache else "without"
            progress(f"exporting ONNX (opset {plan.export.opset}, {kv} KV cache)")
            export = export_decoder(graph, str(folder.path), plan.export)
            tokenizer.save_pretrained(str(folder.path))
            shutil.copyfile(path, folder.path / "recipe.surg")
            lap("export")
            trace = tracing.result() if tracing else None

        verification = None
        if trace is not None:
            progress("verifying against PyTorch (prefill + decode)")
            # The PyTorch weights are not needed past this point; free them before onnxruntime
            # maps the exported ones, so the two copies never add up.
            del graph, hf_model
            gc.collect()
            verification = compare(trace, str(folder.path), VERIFY_TOLERANCE, threads)
            lap("verify")
        timings["total"] = time.perf_counter() - total_start
        report = build_report(
            recipe_text=compiled.text,
            plan=plan,
            before=before,
            after={**after, "parameters": export.parameter_count},
            passes=passes,
            export=export,
            files=folder_bytes(str(folder.path)),
            verification=verification,
            timings=timings,
            warnings=checked.warnings,
        )
        write_report(str(folder.path), report)
        target = folder.commit()
    except BaseException:
        folder.discard()
        raise
    return ApplyResult(target, report, verification)


def default_output(recipe_path: str) -> str:
    """`out/<recipe name>` under the working directory."""
    return os.path.join("out", Path(recipe_path).stem)
