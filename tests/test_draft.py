"""`draft { ... }` and `draft ngram N`: a draft model built from the same checkpoint beside the
target, its tensors shared where they are the target's, wired into genai_config.json, and
checked in onnxruntime-genai (greedy tokens with it equal the target's alone)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from conftest import run_cli
from surgery.backend.speculative import best_draft_tokens, expected_speedup
from surgery.cli.codes import EXIT_VERIFY_FAILED


def _apply(tmp_path: Path, body: str, *extra: str):
    recipe = tmp_path / "r.surg"
    recipe.write_text(f'model "tiny-llama"\ncalibrate on "wikitext-2-valid" samples 4 length 64\n{body}\nexport onnx\n')
    return run_cli("apply", str(recipe), "-o", str(tmp_path / "out"), *extra), tmp_path / "out"


def _external_locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }


def test_an_int8_draft_is_built_beside_the_target_and_gives_the_targets_tokens(tmp_path):
    result, out = _apply(tmp_path, "draft tokens 4 {\n    quantize layers to int8\n    quantize head to int8\n}")
    assert result.code == 0, result.err
    report = json.loads((out / "surgery.json").read_text())
    draft = report["draft"]
    assert draft["passed"] and draft["verification"]["passed"]
    assert draft["genai"]["tokens_equal"] and len(draft["genai"]["prompts"]) == 3
    assert 0 <= draft["predicted"]["top1_agreement"] <= 1 and draft["predicted"]["positions"] > 0
    assert draft["predicted"]["acceptance"] == draft["predicted"]["greedy_text_agreement"]
    assert draft["predicted"]["greedy_text_positions"] == 3 * 64
    assert draft["max_draft_tokens"] == 4 and not draft["max_draft_tokens_chosen"]
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["draft"]["filename"] == "draft.onnx"
    assert config["speculative"] == {"max_draft_tokens": 4}
    # its quantized tensors are its own; the float norms equal the target's and are read from it
    assert _external_locations(out / "draft.onnx") <= {"draft.onnx.data", "model.onnx.data"}
    assert draft["files"]["own_bytes"] > 0
    assert report["verdict"]["passed"]
    assert "draft: draft.onnx" in result.out and "greedy tokens equal" in result.out


def test_a_layer_dropped_draft_reads_every_tensor_from_the_targets_data_file(tmp_path):
    result, out = _apply(tmp_path, "draft {\n    drop block layers 2, 3\n}")
    assert result.code == 0, result.err
    draft = json.loads((out / "surgery.json").read_text())["draft"]
    assert draft["files"]["own_bytes"] == 0 and draft["files"]["shared_bytes"] > 0
    assert not (out / "draft.onnx.data").exists()
    assert _external_locations(out / "draft.onnx") == {"model.onnx.data"}
    assert draft["genai"]["tokens_equal"] and draft["passed"]
    assert draft["max_draft_tokens_chosen"] and 1 <= draft["max_draft_tokens"] <= 16


def test_ngram_drafting_needs_no_model(tmp_path):
    result, out = _apply(tmp_path, "draft ngram 3")
    assert result.code == 0, result.err
    config = json.loads((out / "genai_config.json").read_text())
    assert "draft" not in config["model"] and config["speculative"] == {"ngram_size": 3, "max_draft_tokens": 3}
    assert not (out / "draft.onnx").exists()
    assert json.loads((out / "surgery.json").read_text())["draft"]["genai"]["tokens_equal"]


def test_a_draft_that_changes_the_tokens_is_left_out_and_fails_the_output(tmp_path, monkeypatch):
    import surgery.backend.speculative as speculative

    def different(*args, **kwargs):
        return {"prompts": [], "tokens_equal": False, "acceptance": None, "speedup": 1.0}

    monkeypatch.setattr(speculative, "genai_speculation", different)
    result, out = _apply(tmp_path, "draft ngram 3")
    assert result.code == EXIT_VERIFY_FAILED
    report = json.loads((out / "surgery.json").read_text())
    assert report["draft"]["passed"] is False and not report["verdict"]["passed"]
    config = json.loads((out / "genai_config.json.failed-check").read_text())  # held back, and without it
    assert "speculative" not in config
    assert "error: the draft failed" in result.err


def test_k_is_the_one_with_the_highest_expected_speedup():
    assert best_draft_tokens(0.999, 0.01) == 16  # a near-perfect, near-free draft: as many as allowed
    assert best_draft_tokens(0.5, 0.5) == 1
    assert best_draft_tokens(0.9, 0.1) > best_draft_tokens(0.7, 0.1)
    # K = 1 at acceptance a and cost c: (1 + a) tokens per (1 + c) target steps
    assert expected_speedup(0.8, 0.25, 1) == pytest.approx(1.8 / 1.25)


def test_surgery_run_drafts_with_the_folders_draft_and_writes_the_targets_own_tokens(tmp_path):
    """Greedy decoding with the draft (some drafts rejected, so the caches are cut back) gives
    exactly the tokens of the target alone, in `surgery run` and in `speculative_generate`."""
    from surgery.backend.runtime import OnnxCausalLM
    from surgery.backend.speculative import speculative_generate

    block = "draft {\n    quantize layers to int4 block 128\n    quantize head to int4 block 128\n}"
    result, out = _apply(tmp_path, block)
    assert result.code == 0, result.err
    target, draft = OnnxCausalLM(str(out)), OnnxCausalLM(str(out / "draft.onnx"))
    for prompt in ([72, 101, 108, 108, 111, 44, 32], [5, 9, 200, 13]):
        plain = target.generate(prompt, 40, set())
        for k in (1, 3, 6):
            tokens, stats = speculative_generate(target, draft, prompt, 40, set(), k)
            assert tokens == plain
            assert 0 < stats["draft_tokens_accepted"] < stats["draft_tokens_checked"]
    with_draft = run_cli("run", str(out), "--prompt", "Hello, world", "--max-new-tokens", "24")
    alone = run_cli("run", str(out), "--prompt", "Hello, world", "--max-new-tokens", "24", "--no-draft")
    assert with_draft.code == alone.code == 0
    assert with_draft.out == alone.out
    assert "drafts accepted" in with_draft.err and "drafts accepted" not in alone.err
    evaluated = run_cli("eval", str(out), "--max-tokens", "512", "--window", "128", "--json")
    assert evaluated.code == 0, evaluated.err
    draft = json.loads(evaluated.out)["draft"]
    assert draft["filename"] == "draft.onnx" and 0 < draft["top1_agreement"] < 1 and draft["positions"] > 0


def test_as_fast_as_possible_builds_every_candidate_and_keeps_the_fastest_or_none(tmp_path):
    result, out = _apply(tmp_path, "draft as fast as possible")
    assert result.code == 0, result.err
    draft = json.loads((out / "surgery.json").read_text())["draft"]
    names = [c["name"] for c in draft["candidates"]]
    assert names[0].startswith("int8") and names[-1] == "n-grams of 3 tokens" and len(names) == 6
    assert all(c["genai"]["tokens_equal"] for c in draft["candidates"])
    speedups = {c["name"]: c["genai"]["speedup"] for c in draft["candidates"]}
    config = json.loads((out / "genai_config.json").read_text())
    if draft["chosen"] is None:  # nothing beat the target alone: nothing is wired in
        assert max(speedups.values()) <= 1 and "speculative" not in config
        assert "none wired in" in result.out
    else:
        assert speedups[draft["chosen"]] == max(speedups.values()) > 1 and "speculative" in config
    assert (out / "draft.onnx").exists() == ("draft" in config["model"])
