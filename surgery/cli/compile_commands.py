"""`surgery check`, `plan` and `apply`: a recipe through the pipeline (surgery/pipeline.py)."""

from __future__ import annotations

import json
import sys

from surgery.backend.verdict import HELD_BACK
from surgery.cli.codes import (
    EXIT_OK,
    EXIT_USER_ERROR,
    EXIT_VERIFY_FAILED,
)
from surgery.progress import ProgressLines


def _print_warnings(warnings) -> None:
    from surgery.diagnostics import render_all

    if warnings:
        print(render_all(warnings), file=sys.stderr)


def run_check(args) -> int:
    """`surgery check`: parse and check a recipe against its model's config; print what was found."""
    from surgery.diagnostics import RecipeError
    from surgery.pipeline import check_recipe, planned_warnings

    try:
        _, checked = check_recipe(args.recipe, args.model)
    except RecipeError as error:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "recipe": args.recipe,
                          "diagnostics": [d.to_json() for d in error.diagnostics]}, indent=2))  # fmt: skip
        return EXIT_USER_ERROR
    # With no importance or search to resolve, the plan's warnings too: check says what plan will.
    planned = planned_warnings(checked)
    warnings = checked.warnings if planned is None else planned
    index = checked.index
    if args.json:
        print(json.dumps({"ok": True, "recipe": args.recipe, "model": checked.spec.text,
                          "architecture": index.architecture, "layers": index.num_layers,
                          "selections_resolved": planned is not None,
                          "diagnostics": [d.to_json() for d in warnings]}, indent=2))  # fmt: skip
        return EXIT_OK
    _print_warnings(warnings)
    print(f"ok: {args.recipe} checks against {checked.spec.text} ({index.architecture}, {index.num_layers} layers)")
    if planned is None:
        print("  (layers chosen by importance or a search are resolved by `surgery plan`, which may warn about them)")
    return EXIT_OK


def run_plan(args) -> int:
    """`surgery plan`: print the resolved plan (or its JSON)."""
    from surgery.pipeline import compile_recipe, resolve_expert_steps

    compiled = compile_recipe(
        args.recipe, args.model, progress=ProgressLines(), device=args.device, search=_search_settings(args)
    )
    compiled = resolve_expert_steps(compiled, ProgressLines(), args.device)
    _print_warnings(compiled.plan.warnings)
    if args.json:
        content = compiled.plan.to_json()
        if compiled.searches:
            from surgery.front.syntax import unparse
            from surgery.search.results import search_json

            content["search"] = search_json(list(compiled.searches), unparse(compiled.checked.recipe))
        print(json.dumps(content, indent=2))
    else:
        _print_searches(compiled.searches)
        print(compiled.plan.render())
    return EXIT_OK


def _search_settings(args):
    from surgery.search.engine import SearchSettings

    return SearchSettings(executor=args.executor, workers=args.workers, threads=getattr(args, "threads", None))


def _print_searches(searches) -> None:
    from surgery.search.results import render_table

    for search in searches:
        print(render_table(search))


def run_apply(args) -> int:
    """`surgery apply`: run the recipe, write the output folder, print its summary."""
    from surgery.pipeline import apply, default_output

    progress = ProgressLines()
    output = args.output or default_output(args.recipe)
    result = apply(
        args.recipe,
        output,
        model=args.model,
        force=args.force,
        run_verification=not args.no_verify,
        threads=args.threads,
        progress=progress,
        provider=args.provider,
        device=args.device,
        search=_search_settings(args),
    )
    _print_warnings(tuple(_Rendered(w) for w in result.report["warnings"]))
    report = result.report
    before, after = report["model"]["before"], report["model"]["after"]
    _print_searches(result.searches)
    print(f"wrote {result.output}")
    print(
        f"  layers {before['layers']} -> {after['layers']}, attention layers {len(before['attention_layers'])} -> "
        f"{len(after['attention_layers'])}, parameters {before['parameters']:,} -> {after['parameters']:,}, "
        f"{after['bytes'] / 1e6:.1f} MB"
    )
    cache = _cache_line(report["kv_cache"])
    if cache:
        print(cache)
    quality = _quality_line(report, result.verification)
    if quality:
        print(quality)
    code = EXIT_OK
    verification = result.verification
    if verification is None:
        print("  verification skipped (--no-verify)")
    else:
        before_q = ""
        if verification.quantized_weights:
            before_q = " (quantized weights, float compute)"
        elif "quantization" in report:
            before_q = " (before quantization)"
        if verification.reference != "greedy decode":
            before_q = before_q[:-1] + f"; {verification.reference})" if before_q else f" ({verification.reference})"
        print(
            f"  verification{before_q}: max |logit diff| {verification.max_abs_logit_diff:.2e} "
            f"(tolerance {verification.tolerance:g}), "
            f"greedy tokens agree {verification.greedy_tokens_compared - verification.greedy_tokens_mismatched}/"
            f"{verification.greedy_tokens_compared}"
            + (
                f"; {verification.fusion_ties} position(s) fused an equally scored other layer (IKS tie)"
                if verification.fusion_ties
                else ""
            )
            + (
                f"; {verification.precision} against PyTorch in {verification.precision}, against fp32: "
                f"KL {verification.fp32_kl:.2e}, top-1 {verification.fp32_top1:.1%}"
                if verification.fp32_kl is not None
                else ""
            )
        )
        if not verification.passed:
            print(f"error: verification failed: {verification.reason}", file=sys.stderr)
            code = EXIT_VERIFY_FAILED
    quantization = report.get("quantization")
    if quantization:
        parts = []
        if quantization["widths"]:
            widths = ", ".join(f"{w['linears']} linears at {name}" for name, w in quantization["widths"].items())
            parts.append(
                f"{widths}; average bits per weight {quantization['quantized_linears_nominal_bits']:.3f} "
                f"({quantization['quantized_linears_storage_bits']:.3f} with scales and zero points)"
            )
        embedding = quantization.get("embedding")
        if embedding:
            shared = ", sharing the head's tensors" if embedding["shared_with_head"] else ""
            parts.append(f"embedding at int{embedding['bits']}{shared}")
        print(
            f"  quantization: {'; '.join(parts)}; whole model {quantization['model_storage_bits']:.3f} bits per "
            f"weight; files {quantization['bytes_before'] / 1e6:.1f} MB -> {quantization['bytes_after'] / 1e6:.1f} MB"
        )
        moved = quantization.get("against_pytorch_fp32")
        if moved:
            agree = moved["greedy_tokens_compared"] - moved["greedy_tokens_mismatched"]
            print(
                f"  logits moved by quantization (informational, no tolerance): max |logit diff| "
                f"{moved['max_abs_logit_diff']:.2f}, greedy tokens agree {agree}/{moved['greedy_tokens_compared']} "
                f"against PyTorch {moved.get('reference_precision', 'fp32')}"
            )
    perplexity = report.get("perplexity")
    if perplexity:
        before, after = perplexity["original_pytorch"], perplexity["output_onnxruntime"]
        print(
            f"  perplexity: {before['perplexity']:.2f} -> {after['perplexity']:.2f} ({perplexity['increase']:+.1%}, "
            f"allowed +{perplexity['max_increase']:.0%}) on {after['tokens_scored']} tokens"
        )
        if not perplexity["passed"]:
            print("error: the perplexity check failed", file=sys.stderr)
            code = EXIT_VERIFY_FAILED
    retrieval = report.get("retrieval")
    if retrieval:
        before, after = retrieval["original_pytorch"]["lengths"], retrieval["output_onnxruntime"]["lengths"]
        found = ", ".join(f"{before[length]['accuracy']:.0%} -> {entry['accuracy']:.0%} at {int(length):,}"
                          for length, entry in after.items())  # fmt: skip
        print(f"  pass-key retrieval: {found} tokens (allowed loss {retrieval['max_loss']:.0%})")
        if not retrieval["passed"]:
            print("error: the retrieval check failed", file=sys.stderr)
            code = EXIT_VERIFY_FAILED
    decode = report.get("decode")
    if decode:
        times = ", ".join(f"{ms:.2f} ms after {int(length):,}" for length, ms in decode["ms_per_token"].items())
        print(f"  decode per token: {times} tokens of cache (onnxruntime {decode['provider']})")
    draft = report.get("draft")
    if draft:
        print(_draft_line(draft))
        if draft.get("passed") is False:
            print(f"error: the draft failed: {draft['reason']}", file=sys.stderr)
            code = EXIT_VERIFY_FAILED
    if code == EXIT_VERIFY_FAILED:
        print(
            f"  the output is kept for inspection and marked as failed: `surgery run` and `surgery eval` refuse it "
            f"without --allow-failed, and its genai config is held back as {HELD_BACK} (onnxruntime-genai will not "
            f"load it); `surgery accept {output}` accepts it",
            file=sys.stderr,
        )
    return code


def _draft_line(draft: dict) -> str:
    """What the draft is and what it measured: its acceptance predicted and measured, and the
    speed-up of greedy generation in onnxruntime-genai."""
    k = draft.get("max_draft_tokens")
    if draft.get("kind") == "ngram":
        what = f"n-grams of {draft['ngram_size']} tokens, {k} drafted at a time"
    elif "predicted" in draft:
        own, shared = draft["files"]["own_bytes"] / 1e6, draft["files"]["shared_bytes"] / 1e6
        chosen = " (chosen)" if draft.get("max_draft_tokens_chosen") else ""
        what = (f"draft.onnx ({own:.1f} MB of its own, {shared:.1f} MB shared with the target), {k} tokens at a "
                f"time{chosen}; acceptance predicted {draft['predicted']['acceptance']:.2f}")  # fmt: skip
    elif draft.get("kind") == "none":
        tried = draft.get("candidates") or []
        best = max((c for c in tried if isinstance(c.get("genai"), dict)), key=lambda c: c["genai"]["speedup"],
                   default=None)  # fmt: skip
        fastest = f" (the fastest, {best['name']}: {best['genai']['speedup']:.2f}x)" if best else ""
        return f"  draft: none wired in: no candidate of {len(tried)} was faster than the model alone{fastest}"
    else:
        what = "not built"
    if draft.get("candidates"):
        what = f"the fastest of {len(draft['candidates'])} candidates, {draft['chosen']}: {what}"
    genai = draft.get("genai")
    if isinstance(genai, dict):
        accepted = f"{genai['acceptance']:.2f}" if genai["acceptance"] is not None else "-"
        what += (f", measured {accepted}; greedy tokens {'equal' if genai['tokens_equal'] else 'DIFFERENT'}, "
                 f"{genai['speedup']:.2f}x tokens per second in onnxruntime-genai (median of {len(genai['prompts'])} "
                 f"prompts)")  # fmt: skip
        if genai["speedup"] < 1:
            what += "; slower than the target alone here: a cheaper draft (fewer layers, int4) may pay"
    elif genai:
        what += f"; {genai}"
    return f"  draft: {what}"


def _cache_line(cache: dict) -> str | None:
    """The KV cache's bytes per token before and after, and the context that fits 4 GB of it."""
    if "after" not in cache:
        return None
    before, after = cache["before"], cache["after"]
    if before["bytes_per_token"] == after["bytes_per_token"]:
        return None
    quantized = len(cache["formats"])
    formats = f", {quantized} layer(s) quantized" if quantized else ""
    state = cache.get("conv_state_bytes", 0)
    state = f", plus {state:,} bytes of convolution state per sequence" if state else ""
    return (f"  KV cache: {before['bytes_per_token']:,} -> {after['bytes_per_token']:,} bytes per token "
            f"({cache['element']}{formats}{state}); context in 4 GB: {before['longest_context_in']['4 GB']:,} -> "
            f"{after['longest_context_in']['4 GB']:,} tokens")  # fmt: skip


def _quality_line(report: dict, verification) -> str | None:
    """For an output whose logits are meant to move (quantized, or below fp32), the measures
    that say how much it matters, first: mean KL divergence and top-1 agreement against the same
    graph in PyTorch (unquantized; in fp32), and the perplexity change against the original
    model when the recipe measured it."""
    moved = (report.get("quantization") or {}).get("against_pytorch_fp32") or {}
    parts = []
    if moved.get("mean_kl") is not None:
        parts.append(f"quantized vs the same layers in PyTorch {moved.get('reference_precision', 'fp32')}: mean KL "
                     f"{moved['mean_kl']:.4f} nats/token, top-1 agreement {moved['top1_agreement']:.1%} "
                     f"({moved['positions']} positions of the verification prompts and decode steps)")  # fmt: skip
    elif verification is not None and verification.fp32_kl is not None:
        parts.append(f"{verification.precision} vs the same layers in PyTorch fp32: mean KL {verification.fp32_kl:.2e} "
                     f"nats/token, top-1 agreement {verification.fp32_top1:.1%} "
                     f"({sum(verification.prompt_lengths)} prompt positions)")  # fmt: skip
    perplexity = report.get("perplexity")
    if parts and perplexity:
        before, after = perplexity["original_pytorch"]["perplexity"], perplexity["output_onnxruntime"]["perplexity"]
        parts.append(f"perplexity vs the original model {before:.2f} -> {after:.2f} ({perplexity['increase']:+.1%})")
    return "  quality: " + "; ".join(parts) if parts else None


class _Rendered:
    """A warning already rendered to text (from the report)."""

    severity = "warning"
    span = None

    def __init__(self, text: str):
        self.text = text

    def render(self) -> str:
        return self.text
