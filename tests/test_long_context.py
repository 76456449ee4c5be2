"""Long windows are scored a piece at a time (surgery/backend/long_context.py): onnxruntime's
chunked prefill through the output's KV cache and PyTorch's layer-major pieces give the
perplexity of the whole window at once, sliding-window families included."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli, tiny_graph
from surgery.backend import long_context
from surgery.backend.evaluate import EvalTokens, compare, compare_with_graph, graph_perplexity, onnx_logits, perplexity
from surgery.data import TextSource
from surgery.export.decoder import export_decoder


def _tokens(graph, window: int) -> EvalTokens:
    ids = np.random.default_rng(3).integers(0, graph.index.vocab_size, 3 * window + 7)
    return EvalTokens(TextSource("random", "random", False, ""), ids, window)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_pieces_score_as_the_whole_window(name, tmp_path, monkeypatch):
    graph = tiny_graph(name)
    export_decoder(graph, str(tmp_path))
    tokens = _tokens(graph, 96)
    whole_onnx = perplexity(onnx_logits(str(tmp_path)), tokens).perplexity
    whole_torch = graph_perplexity(graph, tokens).perplexity
    monkeypatch.setattr(long_context, "PIECE", 20)  # 96-token windows in pieces of 20 (the last short)
    streamed = onnx_logits(str(tmp_path), stream=True)
    assert not isinstance(streamed(tokens.windows()[0][None]), np.ndarray)
    assert perplexity(streamed, tokens).perplexity == pytest.approx(whole_onnx, rel=1e-5)
    assert graph_perplexity(graph, tokens).perplexity == pytest.approx(whole_torch, rel=1e-5)
    against = compare_with_graph(streamed, graph, tokens)
    assert against.mean_kl < 1e-6 and against.top1_agreement == 1.0
    assert compare(streamed, onnx_logits(str(tmp_path)), tokens).mean_kl < 1e-6


def test_the_window_is_checked_against_the_context(tmp_path):
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\nverify perplexity on "wikitext-2-test" max-increase 5% window 100000\n')
    result = run_cli("check", str(recipe))
    assert result.code != 0 and "longer than the model's context" in result.err
    recipe.write_text('model "tiny-llama"\nverify perplexity on "wikitext-2-test" max-increase 5% tokens 64 '
                      "window 128\n")
    result = run_cli("check", str(recipe))
    assert result.code != 0 and "64 tokens do not fill one window of 128" in result.err
    recipe.write_text('model "tiny-llama"\nverify perplexity on "wikitext-2-test" max-increase 5% window 128\n')
    result = run_cli("plan", str(recipe))
    assert result.code == 0 and "windows of 128" in result.out
