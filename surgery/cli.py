"""The `surgery` command line.

Exit codes: 0 ok, 1 user error (recipe, model, input files or output folder; a message says
what to change), 2 usage error, 3 verification or the recipe's perplexity check failed (the
output is kept and its report says why), 4 internal error (a bug: one line names the exception
and where, and a report file has the full traceback). `main(argv)` runs a command in-process
and returns its exit code; it never raises and never prints a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time

from surgery import __version__
from surgery.data import DEFAULT_EVALUATION_TEXT
from surgery.diagnostics import HintedError
from surgery.memory import return_freed_memory_to_the_system

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_VERIFY_FAILED, EXIT_INTERNAL_ERROR = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
_ENVIRONMENT_ERRORS = {
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.EIO
}  # fmt: skip


def _add_search_options(command: argparse.ArgumentParser) -> None:
    """--executor and --workers: where and how many `as many as fit` candidates run at once."""
    command.add_argument(
        "--executor",
        choices=("process", "ray"),
        default="process",
        help="where `as many as fit` candidates are built and measured: a local process pool (default) or Ray "
        "(the ray extra; RAY_ADDRESS joins a cluster, else a local Ray starts)",
    )
    command.add_argument(
        "--workers", type=_count(1), metavar="N", help="candidates measured at once (default: half the CPU cores)"
    )


def _count(minimum: int):
    """An argparse type: a whole number from `minimum` to a billion (usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text) if len(text) <= 12 else None
        except ValueError:
            value = None
        if value is None or not minimum <= value <= 10**9:
            raise argparse.ArgumentTypeError(f"expected a whole number from {minimum} to 1000000000, got {text[:20]!r}")
        return value

    return parse


def _finite(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text[:20]!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Declarative model surgery: compile a .surg recipe into a verified ONNX Runtime model.",
        epilog="Recipe language reference: docs/recipes.md. Exit codes: 0 ok, 1 user error, 2 usage error, "
        "3 verification or the perplexity check failed, 4 internal error (a bug; a report file is written).",
    )
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    parser.add_argument(
        "-v", "--verbose", dest="verbose_global", action="store_true", help="show the libraries' warnings and logs"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="also show warnings, logs and progress bars of the libraries"
    )
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True), common)

    apply = commands.add_parser("apply", help="run a recipe and write a verified ONNX model folder")
    apply.add_argument("recipe", metavar="RECIPE", help="the .surg recipe file")
    apply.add_argument("--model", metavar="SPEC", help="model to use instead of the recipe's `model` statement")
    apply.add_argument("-o", "--output", metavar="OUT", help="output folder (default: out/<recipe name>)")
    apply.add_argument(
        "--force", action="store_true", help="replace an earlier output of `surgery apply` (never another folder)"
    )
    apply.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch verification")
    apply.add_argument("--threads", type=_count(1), metavar="N", help="onnxruntime threads for verification")
    apply.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="verify on onnxruntime's CPU or CUDA execution provider (cuda needs onnxruntime-gpu: the gpu extra)",
    )
    apply.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="run PyTorch's work (importance scoring, expert statistics, the reference side of verification and "
        "of `verify perplexity`) on this device, one layer there at a time (default cpu)",
    )
    _add_search_options(apply)

    check = commands.add_parser("check", help="check a recipe against the model's config (no weights loaded)")
    check.add_argument("recipe", metavar="RECIPE")
    check.add_argument("--model", metavar="SPEC", help="model to use instead of the recipe's `model` statement")

    plan = commands.add_parser(
        "plan",
        help="print the resolved plan: steps, targets, recipe lines "
        "(expert groups of merge/prune steps are computed on the calibration data)",
    )
    plan.add_argument("recipe", metavar="RECIPE")
    plan.add_argument("--model", metavar="SPEC", help="model to use instead of the recipe's `model` statement")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_search_options(plan)
    plan.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="run importance scoring and expert statistics in PyTorch on this device, one layer there at a time "
        "(default cpu)",
    )

    importance = commands.add_parser(
        "importance",
        help="score how much each layer matters; write an importance file (JSON) for recipes",
        description="Compute per-layer importance scores and write them as an importance file "
        '(format: docs/importance.md). Recipes use it with `by "FILE"`.',
    )
    importance.add_argument("--model", metavar="SPEC", default="smollm2-135m", help="model (default: smollm2-135m)")
    importance.add_argument(
        "--metric", required=True, metavar="M[,M...]", help="metrics: similarity, lim, iks (need data), zd (data-free)"
    )
    importance.add_argument(
        "--data", metavar="FILE|builtin", default=None, help="calibration text (default: wikitext-2-valid)"
    )
    importance.add_argument("--samples", type=_count(1), metavar="N", help="calibration samples (default 64)")
    importance.add_argument("--seq-len", type=_count(2), metavar="L", help="tokens per sample (default 256)")
    importance.add_argument("--seed", type=_count(0), metavar="S", help="which samples are drawn (default 0)")
    importance.add_argument(
        "--zd-threshold", type=_finite, default=1.0, metavar="Z", help="zd: z-score cut (default 1)"
    )
    importance.add_argument(
        "--zd-more-important",
        choices=("lower", "higher"),
        default="lower",
        help="zd: which scores mean more important (default lower: fewer large weights)",
    )
    importance.add_argument("-o", "--output", required=True, metavar="FILE.json", help="where to write the file")
    importance.add_argument("--plot", metavar="FILE.png", help="also plot the scores per layer (needs matplotlib)")
    importance.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    importance.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="run importance scoring in PyTorch on this device, one layer there at a time (default cpu)",
    )

    evaluate = commands.add_parser(
        "eval",
        help="perplexity of an output folder in ONNX Runtime, optionally against another model",
        description="Chunked perplexity: the first --max-tokens tokens of the text, in non-overlapping windows of "
        "--window tokens, each from an empty context (the first token of a window is not scored).",
    )
    evaluate.add_argument("output", metavar="OUT", help="a folder written by `surgery apply`")
    evaluate.add_argument(
        "--data", default=DEFAULT_EVALUATION_TEXT, metavar="FILE|builtin", help=f"(default: {DEFAULT_EVALUATION_TEXT})"
    )
    evaluate.add_argument(
        "--max-tokens", type=_count(2), default=8192, metavar="N", help="tokens evaluated (default 8192)"
    )
    evaluate.add_argument("--window", type=_count(2), default=512, metavar="W", help="tokens per window (default 512)")
    evaluate.add_argument(
        "--against",
        metavar="SPEC",
        help="also score this model on the same tokens (a model spec, run in PyTorch, or another output folder) and "
        "report mean KL divergence and top-1 agreement",
    )
    evaluate.add_argument("--threads", type=_count(1), metavar="N", help="onnxruntime intra-op threads")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="score on onnxruntime's CPU or CUDA execution provider (cuda needs onnxruntime-gpu: the gpu extra)",
    )
    evaluate.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="run the --against model (a model spec, in PyTorch) on this device, one layer there at a time "
        "(default cpu)",
    )

    run = commands.add_parser("run", help="greedy generation with an output folder in ONNX Runtime")
    run.add_argument("output", metavar="OUT", help="a folder written by `surgery apply`")
    run.add_argument("--prompt", required=True, metavar="TEXT")
    run.add_argument("--max-new-tokens", type=_count(1), default=32, metavar="N")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    run.add_argument("--threads", type=_count(1), metavar="N", help="onnxruntime intra-op threads")
    run.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="generate on onnxruntime's CPU or CUDA execution provider (cuda needs onnxruntime-gpu: the gpu extra)",
    )
    return parser


class _Commands:
    """The subcommand table; every subcommand takes the common options (--verbose)."""

    def __init__(self, subparsers, common: argparse.ArgumentParser):
        self.subparsers, self.common = subparsers, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        """A subcommand parser with the common options."""
        return self.subparsers.add_parser(name, parents=[self.common], **kwargs)


class _Progress:
    """Phase lines on stderr with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _print_warnings(warnings) -> None:
    from surgery.diagnostics import render_all

    if warnings:
        print(render_all(warnings), file=sys.stderr)


def _cmd_check(args) -> int:
    from surgery.pipeline import check_recipe

    _, checked = check_recipe(args.recipe, args.model)
    _print_warnings(checked.warnings)
    index = checked.index
    print(f"ok: {args.recipe} checks against {checked.spec.text} ({index.architecture}, {index.num_layers} layers)")
    return EXIT_OK


def _cmd_plan(args) -> int:
    from surgery.pipeline import compile_recipe, resolve_expert_steps

    compiled = compile_recipe(
        args.recipe, args.model, progress=_Progress(), device=args.device, search=_search_settings(args)
    )
    compiled = resolve_expert_steps(compiled, _Progress(), args.device)
    _print_warnings(compiled.plan.warnings)
    if args.json:
        content = compiled.plan.to_json()
        if compiled.searches:
            from surgery.search.results import search_json
            from surgery.syntax import unparse

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


def _cmd_apply(args) -> int:
    from surgery.pipeline import apply, default_output

    progress = _Progress()
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
            print(f"error: verification failed: {verification.reason} (output kept for inspection)", file=sys.stderr)
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
                f"  quantized vs PyTorch {moved.get('reference_precision', 'fp32')}: max |logit diff| "
                f"{moved['max_abs_logit_diff']:.2f}, "
                f"greedy tokens agree {agree}/{moved['greedy_tokens_compared']}"
            )
    perplexity = report.get("perplexity")
    if perplexity:
        before, after = perplexity["original_pytorch"], perplexity["output_onnxruntime"]
        print(
            f"  perplexity: {before['perplexity']:.2f} -> {after['perplexity']:.2f} ({perplexity['increase']:+.1%}, "
            f"allowed +{perplexity['max_increase']:.0%}) on {after['tokens_scored']} tokens"
        )
        if not perplexity["passed"]:
            print("error: the perplexity check failed (output kept for inspection)", file=sys.stderr)
            code = EXIT_VERIFY_FAILED
    return code


class _Rendered:
    """A warning already rendered to text (from the report)."""

    severity = "warning"
    span = None

    def __init__(self, text: str):
        self.text = text

    def render(self) -> str:
        return self.text


def _cmd_run(args) -> int:
    from surgery.model_folder import open_model_folder
    from surgery.runtime import OnnxCausalLM, execution_providers

    folder = open_model_folder(args.output)
    tokenizer = folder.tokenizer
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise _UserError(f"the tokenizer in '{args.output}' has no chat template; run without --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(args.prompt)["input_ids"]
    if not prompt_ids:
        raise _UserError("the prompt is empty after tokenization", "give a prompt with some text")
    if folder.context_length and len(prompt_ids) + args.max_new_tokens > folder.context_length:
        raise _UserError(
            f"the prompt ({len(prompt_ids)} tokens) and --max-new-tokens {args.max_new_tokens} exceed the model's "
            f"context of {folder.context_length} tokens",
            "shorten the prompt or ask for fewer new tokens",
        )
    model = OnnxCausalLM(args.output, threads=args.threads, providers=execution_providers(args.provider))
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    start = time.perf_counter()
    new_tokens = model.generate(list(prompt_ids), args.max_new_tokens, eos_ids)
    seconds = time.perf_counter() - start
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(answer if args.chat else args.prompt + answer)
    print(f"[{len(new_tokens)} tokens in {seconds:.2f}s]", file=sys.stderr)
    return EXIT_OK


class _UserError(HintedError):
    """A problem with the command's arguments or inputs, told as a message (exit 1)."""


def _cmd_importance(args) -> int:
    from surgery.calibration import CalibrationSpec
    from surgery.check import check_command_inputs
    from surgery.data import DEFAULT_CALIBRATION_TEXT, text_file
    from surgery.importance.compute import ScoreRequest, checked_device, compute_importance
    from surgery.importance.file import is_importance_file, save_importance
    from surgery.importance.metrics import METRICS
    from surgery.importance.plot import PNG_SIGNATURE
    from surgery.models.loading import load_model
    from surgery.output import check_replaceable_file

    metrics = tuple(dict.fromkeys(m.strip() for m in args.metric.split(",") if m.strip()))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        shown = ", ".join(m[:40] for m in unknown[:5]) or "(none)"
        raise _UserError(f"unknown metric(s) {shown}; metrics: {', '.join(METRICS)}")
    defaults = CalibrationSpec()
    calibration = CalibrationSpec(
        data=args.data or DEFAULT_CALIBRATION_TEXT,
        samples=args.samples if args.samples is not None else defaults.samples,
        length=args.seq_len if args.seq_len is not None else defaults.length,
        seed=args.seed if args.seed is not None else defaults.seed,
    )
    needs_data = any(METRICS[m].needs_data for m in metrics)
    if not needs_data and (args.data or args.samples or args.seq_len or args.seed is not None):
        print("warning: zd is data-free; --data/--samples/--seq-len/--seed are not used", file=sys.stderr)
    # The same rules as a recipe's `model` and `calibrate` statements, before anything is loaded.
    spec, index = check_command_inputs(args.model, calibration if needs_data else None)
    inputs = [spec.location] if spec.kind in ("folder", "gguf") else []
    if needs_data and text_file(calibration.data):
        inputs.append(text_file(calibration.data))
    check_replaceable_file(args.output, "importance file", is_importance_file, inputs)
    if args.plot:
        _require_matplotlib()
        check_replaceable_file(args.plot, "plot", lambda head: head.startswith(PNG_SIGNATURE), inputs)
    device = checked_device(args.device)
    progress = _Progress()
    progress(f"loading {spec.text}")
    # Scores are computed layer-major: the weights stay in the checkpoint until a layer is scored.
    model, tokenizer, weights = load_model(spec, progress, lazy=True)
    graph = _checked_graph(model, index, weights)
    request = ScoreRequest(metrics, calibration, args.zd_threshold, args.zd_more_important)
    importance = compute_importance(
        graph, tokenizer, spec, request, progress, use_cache=not args.no_cache, device=device
    )
    save_importance(importance, args.output)
    print(f"wrote {args.output}")
    for name, scores in importance.metrics.items():
        for part, values in scores.scores.items():
            order = sorted(
                (i for i, v in enumerate(values) if v == v),
                key=lambda i: values[i],
                reverse=scores.more_important == "higher",
            )
            print(f"  {name} {part}: most important {order[:5]}, least important {order[-5:]}")
    if args.plot:
        from surgery.importance.plot import plot_importance

        plot_importance(importance, args.plot)
        print(f"wrote {args.plot}")
    return EXIT_OK


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise _UserError("--plot needs matplotlib: pip install 'surgery[plot]'") from error


def _cmd_eval(args) -> int:
    from surgery.data import resolve_text
    from surgery.evaluate import compare, compare_with_graph, eval_tokens, onnx_logits, perplexity
    from surgery.model_folder import open_model_folder

    folder = open_model_folder(args.output)
    if folder.context_length and args.window > folder.context_length:
        raise _UserError(
            f"--window {args.window} is longer than the model's context of {folder.context_length} tokens",
            f"use --window {min(512, folder.context_length)} (at most {folder.context_length})",
        )
    text = resolve_text(args.data)
    tokenizer = folder.tokenizer
    tokens = eval_tokens(tokenizer, text, args.max_tokens, args.window)
    if tokens.scored() == 0:
        raise _UserError(f"'{text.name}' has fewer than 2 tokens; there is nothing to score", "give a longer text")
    device = _reference_device(args)
    candidate = onnx_logits(args.output, args.threads, args.provider)
    result: dict = {
        "output": args.output,
        "text": text.to_json(),
        "protocol": f"chunked: {len(tokens.windows())} non-overlapping windows of {args.window} tokens from an empty "
        "context; the first token of each window is not scored",
    }
    if args.against:
        reference = _reference_logits(args.against, tokenizer, args.threads, args.window, args.provider)
        if callable(reference):
            comparison = compare(candidate, reference, tokens)
        else:  # a model in PyTorch, run layer-major: never loaded whole
            comparison = compare_with_graph(candidate, reference, tokens, device)
        result.update(comparison.to_json())
        result["against"] = args.against
    else:
        result["candidate"] = perplexity(candidate, tokens).to_json()
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    own = result["candidate"]
    print(f"{args.output}: perplexity {own['perplexity']:.3f} on {own['tokens_scored']} tokens of {text.name}")
    print(f"  ({result['protocol']})")
    if args.against:
        ref = result["reference"]
        print(f"{args.against}: perplexity {ref['perplexity']:.3f} (same tokens)")
        print(
            f"  increase {result['perplexity_increase']:+.2%}, mean KL(reference || output) {result['mean_kl']:.4f} "
            f"nats/token, top-1 agreement {result['top1_agreement']:.2%}"
        )
    return EXIT_OK


def _is_output_folder(spec_text: str) -> bool:
    """Whether an --against argument names an output folder (run in onnxruntime), not a model spec."""
    return os.path.exists(os.path.join(spec_text, "model.onnx"))


def _reference_device(args) -> str | None:
    """`eval --device`: where the --against model's layers run; refused when it has no effect
    (no --against, or another output folder, which runs in onnxruntime on --provider) or when
    this PyTorch cannot use the device."""
    from surgery.importance.compute import checked_device

    if args.device == "cpu":
        return None
    if not args.against or _is_output_folder(args.against):
        raise _UserError(
            f"--device {args.device} runs the --against model in PyTorch, and there is none here",
            "give --against a model spec (e.g. smollm2-135m), or use --provider for onnxruntime",
        )
    return checked_device(args.device)


def _reference_logits(spec_text: str, tokenizer, threads: int | None, window: int, provider: str = "cpu"):
    """The `--against` model: another output folder's logits in onnxruntime, or, for a model spec,
    its decoder graph in PyTorch with the weights left in the checkpoint (run layer-major)."""
    from surgery.evaluate import onnx_logits
    from surgery.model_folder import open_model_folder
    from surgery.models.index import ModelIndex
    from surgery.models.loading import load_config, load_model, resolve_spec

    if _is_output_folder(spec_text):
        other = open_model_folder(spec_text, tokenizer=False)
        if other.context_length and window > other.context_length:
            raise _UserError(f"--window {window} is longer than the context of '{spec_text}' ({other.context_length})")
        return onnx_logits(spec_text, threads, provider)
    spec = resolve_spec(spec_text)
    config = load_config(spec)
    model, reference_tokenizer, weights = load_model(spec, _Progress(), lazy=True)
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise _UserError(f"'{spec_text}' has a different tokenizer than the output; the tokens would not compare")
    return _checked_graph(model, ModelIndex.from_config(spec_text, config), weights)


def _checked_graph(model, index, weights=None):
    """The model's decoder graph, its architecture description checked against its own forward."""
    from surgery.architectures.conformance import DescriptionMismatch, checked_graph

    try:
        return checked_graph(model, index, weights)
    except DescriptionMismatch as problem:
        raise _UserError(str(problem), problem.hint) from problem


def main(argv: list[str] | None = None) -> int:
    """Run one `surgery` command in-process; returns its exit code (never raises).

    0 ok, 1 user error (a message), 2 usage error, 3 verification failed, 4 internal error
    (one line naming the exception and where, and the path of a report with the traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    return_freed_memory_to_the_system()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help and --version (0), usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    from surgery.console import quiet_console

    with quiet_console(args.verbose or args.verbose_global):
        return _run(args, argv)


def _run(args, argv: list[str]) -> int:
    from surgery.console import print_error, report_internal_error
    from surgery.diagnostics import HintedError, RecipeError
    from surgery.output import OutputError

    handlers = {
        "check": _cmd_check,
        "plan": _cmd_plan,
        "apply": _cmd_apply,
        "importance": _cmd_importance,
        "eval": _cmd_eval,
        "run": _cmd_run,
    }
    try:
        return handlers[args.command](args)
    except RecipeError as error:
        print_error(str(error))
        return EXIT_USER_ERROR
    except OutputError as error:
        print_error(f"error: {error}")
        return EXIT_USER_ERROR
    except HintedError as error:  # a model spec, a text, a file, a built-in model that cannot be fetched
        print_error(f"error: {error}" + (f"\n  = hint: {error.hint}" if error.hint else ""))
        return EXIT_USER_ERROR
    except MemoryError:
        print_error("error: out of memory\n  = hint: close other programs, or use a smaller model or fewer samples")
        return EXIT_USER_ERROR
    except OSError as error:
        # A full disk, a read-only folder, missing permissions: the machine's state, not a bug.
        if error.filename is None and error.errno not in _ENVIRONMENT_ERRORS:
            print_error(report_internal_error(error, argv))
            return EXIT_INTERNAL_ERROR
        where = f": {error.filename}" if error.filename else ""
        print_error(f"error: {(error.strerror or type(error).__name__).lower()}{where}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print_error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as error:
        print_error(report_internal_error(error, argv))
        return EXIT_INTERNAL_ERROR


def entry() -> None:
    """The console script: `main`, then exit without interpreter teardown.

    Tearing down torch and onnxruntime at exit takes most of a second for a small model; by
    the time `main` returns every file surgery wrote is closed and renamed into place, so
    only the standard streams need flushing.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
