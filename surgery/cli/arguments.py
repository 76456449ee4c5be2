"""The command line's arguments: every subcommand, its options and their types."""

from __future__ import annotations

import argparse
import math

from surgery import __version__
from surgery.data import DEFAULT_EVALUATION_TEXT


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


def _non_negative(text: str) -> float:
    """An argparse type: a finite number of at least 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text[:20]!r}")
    return value


def _probability(text: str) -> float:
    """An argparse type: a number above 0 and at most 1."""
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0 and at most 1, got {text[:20]!r}")
    return value


def argument_parser() -> argparse.ArgumentParser:
    """The `surgery` argument parser: every subcommand and its options."""
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
        help="run PyTorch's work (importance scoring, expert statistics, GPTQ, weighted grids and the sensitivity "
        "of `quantize model`, the reference side of verification and of `verify perplexity`) on this device, one "
        "layer there at a time (default cpu)",
    )
    _add_search_options(apply)

    check = commands.add_parser("check", help="check a recipe against the model's config (no weights loaded)")
    check.add_argument("recipe", metavar="RECIPE")
    check.add_argument("--model", metavar="SPEC", help="model to use instead of the recipe's `model` statement")
    check.add_argument(
        "--json", action="store_true", help="print the result as JSON: ok, the model, and every error and warning"
    )

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

    run = commands.add_parser(
        "run",
        help="generate text with an output folder in ONNX Runtime (greedy unless --temperature)",
        description="Generate from a prompt with an output folder in ONNX Runtime and print the text. An instruct "
        "model answers best with --chat (its chat template); greedy decoding (the default) can repeat itself.",
    )
    run.add_argument("output", metavar="OUT", help="a folder written by `surgery apply`")
    run.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue (with --chat: to answer)")
    run.add_argument(
        "--max-new-tokens", type=_count(1), default=32, metavar="N", help="stop after N new tokens (default 32)"
    )
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    run.add_argument(
        "--temperature", type=_non_negative, default=0.0, metavar="T",
        help="sample with this temperature (default 0: greedy, the most likely token each step)",
    )  # fmt: skip
    run.add_argument(
        "--top-p", type=_probability, default=1.0, metavar="P",
        help="with --temperature, sample from the most likely tokens whose probability adds up to P (default 1: all)",
    )  # fmt: skip
    run.add_argument(
        "--seed", type=_count(0), default=0, metavar="S", help="with --temperature, the draw's seed (default 0)"
    )
    run.add_argument(
        "--no-draft", action="store_true",
        help="greedy decoding without the folder's draft model (by default a `draft { ... }` output drafts tokens "
        "that the model checks: the same tokens, sooner)",
    )  # fmt: skip
    run.add_argument("--threads", type=_count(1), metavar="N", help="onnxruntime intra-op threads")
    run.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="generate on onnxruntime's CPU or CUDA execution provider (cuda needs onnxruntime-gpu: the gpu extra)",
    )
    for command in (run, evaluate):
        command.add_argument(
            "--allow-failed",
            action="store_true",
            help="use an output that failed its verification or perplexity check when it was written "
            "(refused otherwise, until `surgery accept`)",
        )

    accept = commands.add_parser(
        "accept",
        help="accept an output that failed its checks: `run`, `eval` and onnxruntime-genai use it from then on",
        description="An output whose verification or perplexity check failed is kept for inspection, marked as "
        "failed in its surgery.json, with its genai_config.json held back as genai_config.json.failed-check. "
        "Accepting records when it was accepted and puts genai_config.json back.",
    )
    accept.add_argument("output", metavar="OUT", help="a folder written by `surgery apply`")

    models = commands.add_parser("models", help="list the built-in models and the model families surgery reads")
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    return parser


class _Commands:
    """The subcommand table; every subcommand takes the common options (--verbose)."""

    def __init__(self, subparsers, common: argparse.ArgumentParser):
        self.subparsers, self.common = subparsers, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        """A subcommand parser with the common options."""
        return self.subparsers.add_parser(name, parents=[self.common], **kwargs)
