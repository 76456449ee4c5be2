"""`verify retrieval`: pass-key prompts of the asked length, and a key counts as found exactly
when greedy decoding writes it, in onnxruntime (prefilled in pieces) and in PyTorch alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, tiny_graph
from surgery.backend import long_context
from surgery.backend.retrieval import RetrievalPrompt, found_by_graph, found_by_output, passkey_prompt
from surgery.backend.runtime import OnnxCausalLM
from surgery.export.decoder import export_decoder
from surgery.models import builtin


@pytest.fixture(scope="module")
def tokenizer():
    return builtin.byte_tokenizer()  # the tiny models' (a byte a token): lengths are easy to reason about


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompts_hold_the_key_where_asked(tokenizer, depth):
    prompt = passkey_prompt(tokenizer, 1024, depth, "48213")
    assert 900 < len(prompt.ids) <= 1024
    assert tokenizer.decode(prompt.ids[prompt.answer_at :]).strip() == "48213"
    text = tokenizer.decode(prompt.ids[: prompt.answer_at])
    assert text.endswith("The pass key is")
    where = text.index("The pass key is 48213") / len(text)
    assert abs(where - depth) < 0.1


def test_found_means_greedy_writes_the_key(tmp_path, monkeypatch):
    graph = tiny_graph("tiny-llama")
    export_decoder(graph, str(tmp_path))
    model = OnnxCausalLM(str(tmp_path))
    prompt = list(np.random.default_rng(5).integers(0, graph.index.vocab_size, 70))
    greedy = model.generate(prompt, 4, set())
    monkeypatch.setattr(long_context, "PIECE", 32)  # the prompt goes through in three pieces
    right = RetrievalPrompt(np.array(prompt + greedy, np.int64), len(prompt), "k", 74, 0.5)
    wrong_tail = [*greedy[:3], (greedy[3] + 1) % graph.index.vocab_size]
    wrong = RetrievalPrompt(np.array(prompt + wrong_tail, np.int64), len(prompt), "k", 74, 0.5)
    assert found_by_output(model, [right, wrong]) == [True, False]
    assert found_by_graph(graph, [right, wrong]) == [True, False]


def test_the_check_compares_the_output_with_the_original(tmp_path):
    recipe = tmp_path / "r.surg"
    # The byte tokenizer spends 200 tokens on the question and the key: a little filler fits.
    recipe.write_text('model "tiny-llama"\nverify retrieval at 240, 256 tokens depths 2\n')
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    report = json.loads(Path(tmp_path, "out", "surgery.json").read_text())["retrieval"]
    assert set(report["output_onnxruntime"]["lengths"]) == {"240", "256"} and report["passed"]
    assert report["output_onnxruntime"] == report["original_pytorch"]
    assert "pass-key retrieval:" in result.out
    recipe.write_text('model "tiny-llama"\nverify retrieval at 64, 99999 tokens depths 30\n')
    result = run_cli("check", str(recipe))
    assert result.code != 0
    assert "64 tokens is outside 128.." in result.err and "99999 tokens" in result.err and "30 depths" in result.err
