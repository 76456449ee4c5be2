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
    target in onnxruntime on the target's own greedy continuations of the check's prompts (what
    speculation sees there), and on the calibration text itself; and both models' decode times
    (ms per token, batch 1), on the provider verification ran on."""
    from surgery.backend.latency import decode_ms_per_token, latency_prompt
    from surgery.backend.runtime import OnnxCausalLM
    from surgery.backend.speculative import greedy_text_agreement, logits_of, top1_agreement

    # One session of each: the target of a 1.5B model is 7 GB in fp32.
    threads, providers = run.settings.threads, run.settings.providers
    target = OnnxCausalLM(str(folder), threads=threads, providers=providers)
    draft = OnnxCausalLM(str(folder / DRAFT_FILE), threads=threads, providers=providers)
    target_logits, draft_logits = logits_of(target), logits_of(draft)
    samples = [np.asarray(row) for row in run.calibration_tokens()[:AGREEMENT_WINDOWS]]
    predicted = top1_agreement(target_logits, draft_logits, samples)
    # The prompts genai's check generates from: the same text speculation will see there.
    prompts = [np.asarray(run.tokenizer(text)["input_ids"]) for text in PROMPTS]
    predicted |= greedy_text_agreement(target, target_logits, draft_logits, prompts, NEW_TOKENS)
    prompt = latency_prompt(64, str(folder))
    target_ms, draft_ms = decode_ms_per_token(target, prompt), decode_ms_per_token(draft, prompt)
    return {**predicted, "target_decode_ms": target_ms, "draft_decode_ms": draft_ms, "cost": draft_ms / target_ms}


def _build_model(run: Run, recipe, statements: list[str], given: int | None, scratch: Path, folder: Path,
                 section: dict) -> bool:  # fmt: skip
    """Build a draft model by its recipe into `scratch`, move it beside the target, predict its
    acceptance, choose K (unless `given`) and wire it in; False (with the reason in `section`)
    when it cannot be used."""
    from surgery.backend.speculative import best_draft_tokens, expected_speedup, share_tensors

    run.progress(f"building the draft: {'; '.join(statements)}")
    built = run.build(recipe, str(scratch))
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
    run.progress("measuring the draft: top-1 agreement with the target on its greedy text, decode times")
    predicted = _predict(run, folder)
    acceptance = predicted["greedy_text_agreement"]
    k = given or best_draft_tokens(acceptance, predicted["cost"], MAX_DRAFT_TOKENS)
    predicted["acceptance"] = acceptance
    predicted["expected_speedup"] = expected_speedup(acceptance, predicted["cost"], k)
    section["predicted"] = predicted
    section["max_draft_tokens"] = k
    section["max_draft_tokens_chosen"] = given is None
    _wire(folder, decoder, {"max_draft_tokens": k})
    return True


def _wire_ngram(folder: Path, size: int, given: int | None, section: dict) -> None:
    k = given or DEFAULT_NGRAM_TOKENS
    section.update(kind="ngram", ngram_size=size, max_draft_tokens=k)
    _wire(folder, None, {"ngram_size": size, "max_draft_tokens": k})


def _measure(run: Run, folder: Path, section: dict, rounds: int = 3) -> bool:
    """Check the wired draft in onnxruntime-genai (section's `genai`, `passed`); False when the
    draft changes the tokens (it is then taken out of genai_config.json) or genai is missing."""
    run.progress(f"checking speculation in onnxruntime-genai: {len(PROMPTS)} prompts, {NEW_TOKENS} greedy tokens, "
                 "with and without the draft")  # fmt: skip
    from surgery.backend.speculative import GenaiUnavailable, genai_speculation

    try:
        measured = genai_speculation(folder, Path(run.folder.scratch()), PROMPTS, NEW_TOKENS, rounds)
    except GenaiUnavailable as missing:
        section.update(passed=None, genai=f"not measured: {missing} ({missing.hint}); the draft is wired in but "
                                          "unchecked")  # fmt: skip
        return False
    section["genai"] = measured
    if not measured["tokens_equal"]:
        _unwire(folder)
        section.update(passed=False, reason="greedy tokens with the draft differ from the target's alone; the draft "
                                            "is left out of genai_config.json")  # fmt: skip
        return False
    section["passed"] = True
    return True


def _remove_draft(folder: Path) -> None:
    _unwire(folder)
    for name in (DRAFT_FILE, DRAFT_FILE + ".data"):
        (folder / name).unlink(missing_ok=True)


def _fastest(run: Run, step: PlanStep, folder: Path, section: dict) -> None:
    """`draft as fast as possible`: build and measure every candidate, keep the one with the
    highest measured speed-up in genai (the same tokens), or none when no candidate is faster
    than the target alone."""
    p = step.parameters
    scratch = Path(run.folder.scratch())
    tried = section["candidates"] = []
    for position, (candidate, recipe) in enumerate(zip(p["candidates"], step.recipes, strict=True)):
        run.progress(f"draft candidate {position + 1}/{len(p['candidates'])}: {candidate['name']}")
        entry: dict = {"name": candidate["name"], "statements": candidate.get("statements", [])}
        if candidate.get("ngram_size"):
            _wire_ngram(folder, candidate["ngram_size"], p["max_draft_tokens"], entry)
        else:
            entry["kind"] = "model"
            if not _build_model(run, recipe, entry["statements"], p["max_draft_tokens"], scratch / f"draft-{position}",
                                folder, entry):  # fmt: skip
                tried.append(entry)
                continue
        _measure(run, folder, entry, rounds=2)
        tried.append(entry)
        _remove_draft(folder)
    usable = [e for e in tried if e.get("passed") and e["genai"]["speedup"] > 1]
    if not usable:
        section.update(kind="none", passed=True, chosen=None,
                       reason="no candidate was faster than the target alone; no draft is wired in")  # fmt: skip
        return
    best = max(usable, key=lambda e: e["genai"]["speedup"])
    position = tried.index(best)
    section.update({k: v for k, v in best.items() if k != "name"}, chosen=best["name"])
    section["statements"] = best["statements"]
    if best["kind"] == "ngram":
        _wire_ngram(folder, best["ngram_size"], p["max_draft_tokens"], section)
        return
    from surgery.backend.speculative import share_tensors

    draft_scratch = scratch / f"draft-{position}"
    share_tensors(folder, draft_scratch, DRAFT_FILE)
    _wire(folder, _config(draft_scratch)["model"]["decoder"], {"max_draft_tokens": best["max_draft_tokens"]})


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
    if p.get("candidates"):
        _fastest(run, step, folder, section)
        return
    if p["ngram_size"]:
        _wire_ngram(folder, p["ngram_size"], p["max_draft_tokens"], section)
    else:
        section["kind"] = "model"
        if not _build_model(run, step.recipe, p["statements"], p["max_draft_tokens"],
                            Path(run.folder.scratch()) / "draft", folder, section):  # fmt: skip
            return
    _measure(run, folder, section)
