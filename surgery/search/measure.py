"""Building and measuring one candidate, in whatever process the executor gives it.

A job is plain data (picklable, JSON-able): the candidate's recipe text, where the original
recipe lives (relative paths resolve from there), the measurements the budgets need, and the
original model's perplexities. `measure_candidate` builds the candidate with `apply` (no
verification) into a scratch folder, measures it in onnxruntime, removes the folder and
returns the numbers. Latency follows the benchmark protocol (surgery/backend/latency.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from surgery.formats.precision import precision as precision_record
from surgery.front.budgets import QualityRequest, quality_key
from surgery.front.recipe import Recipe


@dataclass(frozen=True)
class Job:
    """One candidate to build and measure."""

    recipe_path: str
    recipe: Recipe  # the candidate's syntax tree, checked and planned as it is
    text: str  # its canonical text: the cache key and the output's recipe.surg
    build: Callable[..., Any]  # `surgery.pipeline.apply`, passed down (pickled by name for a worker)
    model: str | None
    quality: tuple[QualityRequest, ...]
    reference: dict[str, float]  # quality key -> the original model's perplexity (PyTorch)
    decode_prompts: tuple[int, ...] = ()
    prefill_prompts: tuple[int, ...] = ()
    threads: int | None = None
    scratch: str | None = None


def measure_candidate(job: Job) -> dict[str, Any]:
    """Build the candidate (`apply`, no verification), measure it, remove it; the numbers.

    A candidate that cannot be built or measured comes back as {"error": message}: the
    search reports it at the statement (an exception may not survive the trip back from a
    worker process or a Ray task).
    """
    from surgery.diagnostics import HintedError, RecipeError

    try:
        return _measure(job)
    except RecipeError as problem:
        return {"error": "; ".join(d.message for d in problem.diagnostics)}
    except (HintedError, OSError, ValueError, RuntimeError) as problem:
        return {"error": f"{type(problem).__name__}: {problem}"}


def _measure(job: Job) -> dict[str, Any]:
    start = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="surgery-candidate-", dir=job.scratch)
    try:
        out = os.path.join(scratch, "out")
        result = job.build(job.recipe_path, out, model=job.model, run_verification=False, threads=job.threads,
                           recipe=job.recipe)  # fmt: skip
        report = result.report
        built = time.perf_counter() - start
        measured: dict[str, Any] = {
            "bytes": report["model"]["after"]["bytes"],
            "bits": _average_bits(report),
            "kv_bytes_per_token": (report["kv_cache"].get("after") or {}).get("bytes_per_token", 0),
            "build_seconds": round(built, 2),
        }
        measured.update(_quality(job, out))
        measured.update(_latency(job, out))
        measured["seconds"] = round(time.perf_counter() - start, 2)
        return measured
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _average_bits(report: dict) -> float:
    """Average stored bits per weight: the quantization report's, else the export's element type."""
    quantization = report.get("quantization")
    if quantization:
        return float(quantization["model_storage_bits"])
    precision = report.get("plan", {}).get("export", {}).get("precision", "fp32")
    return float(precision_record(precision).bits)


def _quality(job: Job, out: str) -> dict[str, Any]:
    from surgery.backend.evaluate import compare_with_graph, eval_tokens, onnx_logits, perplexity
    from surgery.data import resolve_text
    from surgery.model_folder import open_model_folder

    if not job.quality:
        return {}
    folder = open_model_folder(out)
    base_dir = os.path.dirname(os.path.abspath(job.recipe_path))
    candidate = onnx_logits(out, job.threads, stream=True)
    results: dict[str, Any] = {}
    for request in job.quality:
        tokens = eval_tokens(folder.tokenizer, resolve_text(request.data, base_dir), request.tokens, request.window)
        key = quality_key(request)
        if request.compare:
            comparison = compare_with_graph(candidate, _original_graph(job), tokens)
            ppl, kl, top1 = comparison.candidate.perplexity, comparison.mean_kl, comparison.top1_agreement
        else:
            ppl, kl, top1 = perplexity(candidate, tokens).perplexity, None, None
        results[key] = {
            "perplexity": ppl,
            "increase": ppl / job.reference[key] - 1,
            "kl": kl,
            "top1": top1,
        }
    return {"quality": results}


_ORIGINAL: dict[tuple[str, str | None], Any] = {}


def _original_graph(job: Job):
    """The unmodified model, loaded lazily once per worker (KL and top-1 run it layer-major)."""
    key = (job.recipe_path, job.model)
    if key not in _ORIGINAL:
        from surgery.architectures.conformance import checked_graph
        from surgery.front.check import check
        from surgery.models.loading import load_model

        checked = check(job.recipe, job.model)
        model, _, weights = load_model(checked.spec, lambda _: None, lazy=True)
        _ORIGINAL[key] = checked_graph(model, checked.index, weights)
    return _ORIGINAL[key]


def _latency(job: Job, out: str) -> dict[str, Any]:
    from surgery.backend.latency import decode_ms_per_token, latency_prompt, prefill_ms
    from surgery.backend.runtime import OnnxCausalLM

    if not job.decode_prompts and not job.prefill_prompts:
        return {}
    model = OnnxCausalLM(out, threads=job.threads)
    results: dict[str, Any] = {}
    for prompt in job.decode_prompts:
        results[f"decode_ms prompt {prompt}"] = decode_ms_per_token(model, latency_prompt(prompt, out))
    for prompt in job.prefill_prompts:
        results[f"prefill_ms prompt {prompt}"] = prefill_ms(model, latency_prompt(prompt, out))
    return {"latency": results}
