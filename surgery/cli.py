"""The `surgery` command line.

Exit codes: 0 ok, 1 user error (recipe, model or output problem), 2 usage error,
3 verification failed (the output is kept and its report says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from surgery import __version__

EXIT_OK, EXIT_USER_ERROR, EXIT_VERIFY_FAILED = 0, 1, 3  # 2, usage errors, comes from argparse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Declarative model surgery: compile a .surg recipe into a verified ONNX Runtime model.",
        epilog="Recipe language reference: docs/recipes.md. Exit codes: 0 ok, 1 user error, 2 usage error, "
        "3 verification failed.",
    )
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    apply = commands.add_parser("apply", help="run a recipe and write a verified ONNX model folder")
    apply.add_argument("recipe", metavar="RECIPE", help="the .surg recipe file")
    apply.add_argument("--model", metavar="SPEC", help="model to use instead of the recipe's `model` statement")
    apply.add_argument("-o", "--output", metavar="OUT", help="output folder (default: out/<recipe name>)")
    apply.add_argument("--force", action="store_true", help="replace an existing output folder")
    apply.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch verification")
    apply.add_argument("--threads", type=int, metavar="N", help="onnxruntime threads for verification")

    check = commands.add_parser("check", help="check a recipe against the model's config (no weights loaded)")
    check.add_argument("recipe", metavar="RECIPE")
    check.add_argument("--model", metavar="SPEC", help="model to use instead of the recipe's `model` statement")

    plan = commands.add_parser("plan", help="print the resolved plan: steps, targets, recipe lines")
    plan.add_argument("recipe", metavar="RECIPE")
    plan.add_argument("--model", metavar="SPEC", help="model to use instead of the recipe's `model` statement")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    run = commands.add_parser("run", help="greedy generation with an output folder in ONNX Runtime")
    run.add_argument("output", metavar="OUT", help="a folder written by `surgery apply`")
    run.add_argument("--prompt", required=True, metavar="TEXT")
    run.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    run.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads")
    return parser


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
    from surgery.pipeline import compile_recipe

    compiled = compile_recipe(args.recipe, args.model)
    _print_warnings(compiled.checked.warnings)
    index = compiled.checked.index
    print(
        f"ok: {args.recipe} checks against {compiled.checked.spec.text} "
        f"({index.architecture}, {index.num_layers} layers)"
    )
    return EXIT_OK


def _cmd_plan(args) -> int:
    from surgery.pipeline import compile_recipe

    compiled = compile_recipe(args.recipe, args.model)
    _print_warnings(compiled.checked.warnings)
    if args.json:
        print(json.dumps(compiled.plan.to_json(), indent=2))
    else:
        print(compiled.plan.render())
    return EXIT_OK


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
    )
    _print_warnings(tuple(_Rendered(w) for w in result.report["warnings"]))
    report = result.report
    before, after = report["model"]["before"], report["model"]["after"]
    print(f"wrote {result.output}")
    print(
        f"  layers {before['layers']} -> {after['layers']}, attention layers {len(before['attention_layers'])} -> "
        f"{len(after['attention_layers'])}, parameters {before['parameters']:,} -> {after['parameters']:,}, "
        f"{after['bytes'] / 1e6:.1f} MB"
    )
    verification = result.verification
    if verification is None:
        print("  verification skipped (--no-verify)")
        return EXIT_OK
    print(
        f"  verification: max |logit diff| {verification.max_abs_logit_diff:.2e} "
        f"(tolerance {verification.tolerance:g}), "
        f"greedy tokens agree {verification.greedy_tokens_compared - verification.greedy_tokens_mismatched}/"
        f"{verification.greedy_tokens_compared}"
    )
    if not verification.passed:
        print(f"error: verification failed: {verification.reason} (output kept for inspection)", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    return EXIT_OK


class _Rendered:
    """A warning already rendered to text (from the report)."""

    severity = "warning"
    span = None

    def __init__(self, text: str):
        self.text = text

    def render(self) -> str:
        return self.text


def _cmd_run(args) -> int:
    from transformers import AutoTokenizer

    from surgery.runtime import OnnxCausalLM

    if not os.path.exists(os.path.join(args.output, "model.onnx")):
        raise _UserError(f"'{args.output}' has no model.onnx; give a folder written by `surgery apply`")
    tokenizer = AutoTokenizer.from_pretrained(args.output)
    model = OnnxCausalLM(args.output, threads=args.threads)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise _UserError(f"the tokenizer in '{args.output}' has no chat template; run without --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(args.prompt)["input_ids"]
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    start = time.perf_counter()
    new_tokens = model.generate(list(prompt_ids), args.max_new_tokens, eos_ids)
    seconds = time.perf_counter() - start
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(answer if args.chat else args.prompt + answer)
    print(f"[{len(new_tokens)} tokens in {seconds:.2f}s]", file=sys.stderr)
    return EXIT_OK


class _UserError(Exception):
    pass


def _quiet_libraries() -> None:
    """surgery prints its own progress; transformers' bars and advice would only add noise."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `surgery` command."""
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from surgery.diagnostics import RecipeError
    from surgery.output import OutputError

    handlers = {"check": _cmd_check, "plan": _cmd_plan, "apply": _cmd_apply, "run": _cmd_run}
    try:
        return handlers[args.command](args)
    except RecipeError as error:
        print(str(error), file=sys.stderr)
        return EXIT_USER_ERROR
    except (OutputError, _UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as error:
        print(f"error: {error.strerror}: {error.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
