"""`verify perplexity`: the original model's perplexity in PyTorch, measured before any pass,
against the output's in onnxruntime."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.diagnostics import Diagnostic, RecipeError
from surgery.front.checked import MIN_PERPLEXITY_TOKENS
from surgery.progress import counted

if TYPE_CHECKING:
    from surgery.executor.run import Run


def reference_perplexity(run: Run) -> None:
    """The original model's perplexity, its layers run one at a time on the run's device."""
    from surgery.backend.evaluate import eval_tokens, graph_perplexity
    from surgery.data import resolve_text

    checked, device = run.checked, run.settings.device
    request = checked.perplexity
    tokens = eval_tokens(run.tokenizer, resolve_text(request.data, checked.base_dir), request.tokens, request.window)
    if tokens.scored() < MIN_PERPLEXITY_TOKENS - 1:  # `check` bounded the count without the tokenizer
        raise RecipeError([Diagnostic("error", f"'{request.data}' has too few tokens for a perplexity", request.span)])
    where = f"PyTorch, {device}" if device else "PyTorch"
    with counted(run.progress, f"perplexity of the original model on {tokens.scored()} tokens of "
                 f"{tokens.text.name} ({where}, layer by layer)", len(run.graph.layers), "layer"):  # fmt: skip
        run.reference = tokens, graph_perplexity(run.graph, tokens, device)
    run.clock.lap("reference_perplexity")


def perplexity_check(run: Run) -> None:
    """The output's perplexity in onnxruntime (on the run's provider, as the rest of
    verification) against the original model's, and whether the increase is within the bound."""
    from surgery.backend.evaluate import onnx_logits, perplexity

    settings = run.settings
    tokens, before = run.reference
    with counted(run.progress, f"perplexity of the output (onnxruntime, {settings.provider})",
                 len(tokens.windows()), "window"):  # fmt: skip
        after = perplexity(onnx_logits(str(run.folder.path), settings.threads, settings.provider, stream=True), tokens)
    increase = after.perplexity / before.perplexity - 1
    allowed = run.checked.perplexity.max_increase / 100
    run.sections["perplexity"] = {
        "text": tokens.text.to_json(),
        "protocol": f"chunked: non-overlapping windows of {tokens.window} tokens, first token of each unscored",
        "original_pytorch": before.to_json(),
        "output_onnxruntime": after.to_json(),
        "increase": increase,
        "max_increase": allowed,
        "passed": increase <= allowed,
    }
    run.perplexity_passed = increase <= allowed
