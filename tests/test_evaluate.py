"""`surgery eval` and `verify perplexity`: the same numbers from onnxruntime and from PyTorch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_graph, write
from surgery.backend.evaluate import compare, eval_tokens, onnx_logits, perplexity, torch_logits
from surgery.data import resolve_text
from surgery.export.decoder import export_decoder
from surgery.models import builtin


def _plain_perplexity(graph, ids: np.ndarray, window: int) -> float:
    """Chunked perplexity written out directly with torch's cross entropy."""
    losses = []
    for start in range(0, len(ids), window):
        chunk = torch.from_numpy(ids[start : start + window])[None]
        if chunk.shape[1] < 2:
            continue
        mask = torch.ones_like(chunk)
        logits = graph.forward(chunk, mask, torch.arange(chunk.shape[1])[None])
        losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="none"))
    return math.exp(torch.cat(losses).double().mean().item())


def test_onnx_and_pytorch_perplexity_agree(tmp_path):
    graph = tiny_graph("tiny-mistral")
    export_decoder(graph, str(tmp_path))
    tokens = eval_tokens(builtin.byte_tokenizer(), resolve_text("test"), max_tokens=300, window=128)
    assert [len(w) for w in tokens.windows()] == [128, 128, 44] and tokens.scored() == 297
    ours = perplexity(torch_logits(graph), tokens)
    assert ours.perplexity == pytest.approx(_plain_perplexity(graph, tokens.ids, 128), rel=1e-6)
    result = compare(onnx_logits(str(tmp_path)), torch_logits(graph), tokens)
    assert result.candidate.perplexity == pytest.approx(ours.perplexity, rel=1e-4)
    assert result.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0


RECIPE = """model "tiny-llama"
drop block layers 2
verify perplexity on "wikitext-2-test" max-increase {limit} tokens 256
"""


def test_eval_cli_against_the_original_model(in_tmp):
    assert run_cli("apply", write(in_tmp / "r.surg", RECIPE.format(limit="1000%")), "-o", "out").code == 0
    result = run_cli("eval", "out", "--max-tokens", "400", "--window", "200", "--against", "tiny-llama", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["candidate"]["tokens_scored"] == data["reference"]["tokens_scored"] == 398
    assert data["mean_kl"] > 0 and 0 < data["top1_agreement"] < 1  # a block is gone: predictions moved
    assert data["perplexity_increase"] == pytest.approx(
        data["candidate"]["perplexity"] / data["reference"]["perplexity"] - 1
    )
    text = run_cli("eval", "out", "--max-tokens", "400", "--window", "200")
    assert "perplexity" in text.out and "non-overlapping windows of 200 tokens" in text.out


@pytest.mark.parametrize("limit, code", [("1000%", 0), ("0.001%", 3)])
def test_apply_checks_perplexity_when_the_recipe_asks(in_tmp, limit, code):
    result = run_cli("apply", write(in_tmp / "r.surg", RECIPE.format(limit=limit)), "-o", "out")
    assert result.code == code, result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())["perplexity"]
    assert report["passed"] is (code == 0)
    assert report["output_onnxruntime"]["tokens_scored"] == 255
    assert report["increase"] == pytest.approx(
        report["output_onnxruntime"]["perplexity"] / report["original_pytorch"]["perplexity"] - 1
    )
    assert "perplexity:" in result.out
