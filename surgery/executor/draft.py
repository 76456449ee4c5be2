"""The draft step's work (`draft { ... }`, `draft ngram N`): build the draft, share its tensors
with the target's, choose how many tokens it drafts, wire it into genai_config.json, and check
in onnxruntime-genai that greedy generation with it gives the target's own tokens.

The draft is built by applying its own recipe (the recipe's model, calibration and export with
the block's statements) into the scratch folder, verified there against PyTorch like any
output; its graph then moves beside the target's as `draft.onnx`, reading the target's data
file for every tensor they share (surgery.backend.speculative.share_tensors). Its acceptance is
predicted before genai runs it, from its top-1 agreement with the target on the calibration
text, and K is chosen from that and the two models' measured decode times (unless the recipe
gives it). A draft whose speculation changes the tokens, or that failed its own verification, is
not wired in, and the output's verdict says the draft failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from surgery.formats.speculation import DEFAULT_NGRAM_TOKENS, MAX_DRAFT_TOKENS

if TYPE_CHECKING:
    from surgery.executor.run import Run
    from surgery.front.plan_step import PlanStep

DRAFT_FILE = "draft.onnx"
# Greedy generation in genai with and without the draft: these prompts, this many new tokens.
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    ",
)
NEW_TOKENS = 64
AGREEMENT_WINDOWS = 8  # calibration samples the agreement on the text is measured on
GREEDY_PROMPTS, PROMPT_TOKENS = 4, 32  # the target continues this many of their beginnings greedily


def _config(folder: Path) -> dict | None:
    path = folder / "genai_config.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_config(folder: Path, config: dict) -> None:
    from surgery.export.genai import write_genai_config

    write_genai_config(str(folder), config)


def _wire(folder: Path, decoder: dict | None, speculative: dict) -> None:
    """Add the draft (`decoder`: its genai decoder section; None for n-gram drafting) and the
    speculative options to the target's genai_config.json."""
    config = _config(folder)
    if decoder is not None:
        config["model"]["draft"] = {**decoder, "filename": DRAFT_FILE}
    config["speculative"] = speculative
    _write_config(folder, config)


def _unwire(folder: Path) -> None:
    config = _config(folder)
    config["model"].pop("draft", None)
    config.pop("speculative", None)
    _write_config(folder, config)


def _predict(run: Run, folder: Path) -> dict:
    """The predicted acceptance, before genai runs the draft: the top-1 agreement of draft and
    target in onnxruntime on the target's own greedy continuations of calibration-text prompts
    (what speculation sees), and on the calibration text itself; and both models' decode times
    (ms per token, batch 1), on the provider verification ran on."""
    from surgery.backend.evaluate import onnx_logits
    from surgery.backend.latency import decode_ms_per_token, latency_prompt
    from surgery.backend.runtime import OnnxCausalLM
    from surgery.backend.speculative import greedy_text_agreement, top1_agreement

    threads, provider = run.settings.threads, run.settings.provider
    providers = run.settings.providers
    target = OnnxCausalLM(str(folder), threads=threads, providers=providers)
    draft = OnnxCausalLM(str(folder / DRAFT_FILE), threads=threads, providers=providers)
    target_logits = onnx_logits(str(folder), threads, provider)
    draft_logits = onnx_logits(str(folder / DRAFT_FILE), threads, provider)
    samples = [np.asarray(row) for row in run.calibration_tokens()[:AGREEMENT_WINDOWS]]
    predicted = top1_agreement(target_logits, draft_logits, samples)
    prompts = [row[:PROMPT_TOKENS] for row in samples[:GREEDY_PROMPTS]]
    predicted |= greedy_text_agreement(target, target_logits, draft_logits, prompts, NEW_TOKENS)
    prompt = latency_prompt(64, str(folder))
    target_ms, draft_ms = decode_ms_per_token(target, prompt), decode_ms_per_token(draft, prompt)
    return {**predicted, "target_decode_ms": target_ms, "draft_decode_ms": draft_ms, "cost": draft_ms / target_ms}


def _build_model(run: Run, step: PlanStep, folder: Path, section: dict) -> bool:
    """Build the draft model and move it beside the target; False (with the reason in `section`)
    when it cannot be used."""
    from surgery.backend.speculative import best_draft_tokens, expected_speedup, share_tensors

    scratch = Path(run.folder.scratch()) / "draft"
    run.progress(f"building the draft: {'; '.join(step.parameters['statements'])}")
    built = run.build(step.recipe, str(scratch))
    report = built.report
    section["verification"] = {key: (report.get("verification") or {}).get(key)
                               for key in ("passed", "max_abs_logit_diff", "greedy_agreement")}  # fmt: skip
    section["quantization"] = {key: (report.get("quantization") or {}).get(key)
                               for key in ("model_storage_bits", "quantized_linears_storage_bits")}  # fmt: skip
    section["layers"] = report["model"]["after"]["layers"]
    if not report.get("verdict", {}).get("passed", True):
        failed = "; ".join(report["verdict"]["failed"])
        section.update(passed=False, reason=f"the draft failed its own checks: {failed}")
        return False
    decoder = (_config(scratch) or {}).get("model", {}).get("decoder")
    if decoder is None:
        section.update(passed=False, reason="the draft has no genai_config.json: onnxruntime-genai cannot run it")
        return False
    section["files"] = share_tensors(folder, scratch, DRAFT_FILE)
    run.progress("measuring the draft: top-1 agreement with the target on the calibration text, decode times")
    predicted = _predict(run, folder)
    given = step.parameters["max_draft_tokens"]
    acceptance = predicted["greedy_text_agreement"]
    k = given or best_draft_tokens(acceptance, predicted["cost"], MAX_DRAFT_TOKENS)
    predicted["acceptance"] = acceptance
    predicted["expected_speedup"] = expected_speedup(acceptance, predicted["cost"], k)
    section["predicted"] = predicted
    section["max_draft_tokens"] = k
    section["max_draft_tokens_chosen"] = given is None
    _wire(folder, decoder, {"max_draft_tokens": k})
    return True


def build_draft(run: Run, step: PlanStep) -> None:
    """Run the draft step (see the module docstring); its account is the report's `draft`."""
    folder = Path(run.folder.path)
    p = step.parameters
    section: dict = {"statements": p["statements"], "source": step.source.to_json() if step.source else None}
    run.sections["draft"] = section
    if _config(folder) is None:
        reason = (run.sections.get("onnxruntime_genai") or {}).get("error", "no genai_config.json was written")
        section.update(passed=False, reason=f"onnxruntime-genai cannot run the target: {reason}")
        return
    if p["ngram_size"]:
        k = p["max_draft_tokens"] or DEFAULT_NGRAM_TOKENS
        section.update(kind="ngram", ngram_size=p["ngram_size"], max_draft_tokens=k)
        _wire(folder, None, {"ngram_size": p["ngram_size"], "max_draft_tokens": k})
    else:
        section["kind"] = "model"
        if not _build_model(run, step, folder, section):
            return
    run.progress(f"checking speculation in onnxruntime-genai: {len(PROMPTS)} prompts, {NEW_TOKENS} greedy tokens, "
                 "with and without the draft")  # fmt: skip
    try:
        from surgery.backend.speculative import genai_speculation

        measured = genai_speculation(folder, Path(run.folder.scratch()), PROMPTS, NEW_TOKENS)
    except ImportError:
        section.update(passed=None, genai="not measured: onnxruntime-genai is not installed (pip install "
                                          "'surgery[genai]'); the draft is wired in but unchecked")  # fmt: skip
        return
    section["genai"] = measured
    if not measured["tokens_equal"]:
        _unwire(folder)
        section.update(passed=False, reason="greedy tokens with the draft differ from the target's alone; the draft "
                                            "is left out of genai_config.json")  # fmt: skip
        return
    section["passed"] = True

