"""`measure decode at <lengths> tokens`: the output's decode speed after long contexts, in the report.

pattern: a recipe with `measure decode`; replacement: the report's `decode` section (ms per token
after each length, through a random cache in the output's own layout); comparison: the cache the
timing feeds is the output's own (shapes, element types, codes), a step through it decodes, and
`check` refuses what cannot be measured.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from surgery.backend.latency import decode_after_cache, random_cache
from surgery.backend.runtime import OnnxCausalLM

RECIPE = """model "tiny-llama"
calibrate on "wikitext-2-valid" samples 8 length 64
drop attention layers 1
quantize kv-cache by similarity {{
    most important 2 -> int8
    rest -> int4
}}
{measure}
"""


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode")
    recipe = folder / "r.surg"
    recipe.write_text(RECIPE.format(measure="measure decode at 64, 200 tokens rounds 2"))
    result = run_cli("apply", str(recipe), "-o", str(folder / "out"))
    assert result.code == 0, result.err
    return folder / "out", result


def test_the_report_has_ms_per_token_after_each_length(output):
    folder, result = output
    decode = json.loads((folder / "surgery.json").read_text())["decode"]
    assert list(decode["ms_per_token"]) == ["64", "200"] and all(v > 0 for v in decode["ms_per_token"].values())
    assert all(len(rounds) == 2 for rounds in decode["rounds_ms"].values()) and decode["provider"] == "cpu"
    assert "decode per token: " in result.out and "after 200 tokens of cache" in result.out


def test_the_random_cache_is_the_outputs_own_layout_and_a_step_runs_through_it(output):
    folder, _ = output
    model = OnnxCausalLM(str(folder))
    past = random_cache(model, 50, np.random.default_rng(0))
    # 5 layers keep attention: 2 at int8 (int8 codes), 3 at int4 (two codes a byte).
    kinds = sorted({(str(p.dtype), p.shape[-1]) for p in past})
    assert kinds == [("int8", 16), ("uint8", 8)] and len(past) == 10 and all(p.shape[2] == 50 for p in past)
    out = model.step(np.array([[3]]), np.ones((1, 51), np.int64), np.array([[50]]), past)
    assert out.logits.shape[:2] == (1, 1) and np.isfinite(out.logits).all()
    assert out.present[0].shape()[2] == 51  # the step appended one token to the random cache
    assert decode_after_cache(model, 50, steps=2) > 0


@pytest.mark.parametrize(("measure", "message"), [
    ("measure decode at 250 tokens", "decode after 250 tokens does not fit the model's context of 256"),
    ("measure decode at 64 tokens rounds 0", "0 rounds: use 1..20"),
    ("measure decode at 64 tokens\nexport onnx without kv-cache",
     "decode is measured through the KV cache, and the export has none"),
])  # fmt: skip
def test_check_refuses_what_cannot_be_measured(measure, message, tmp_path):
    recipe = tmp_path / "r.surg"
    text = RECIPE.format(measure=measure)
    if "without kv-cache" in measure:  # no cache to quantize either
        text = 'model "tiny-llama"\n' + measure + "\n"
    recipe.write_text(text)
    result = run_cli("check", str(recipe))
    assert result.code != 0 and message in result.err, result.err
    assert "r.surg:" in result.err


def test_the_statement_round_trips():
    from surgery.front.parser import parse_source
    from surgery.front.syntax import unparse
    from surgery.source import Source

    text = 'model "tiny-llama"\nmeasure decode at 2048, 8192 tokens rounds 5\n'
    recipe = parse_source(Source("r.surg", text))
    assert unparse(recipe).strip().endswith("measure decode at 2048, 8192 tokens rounds 5")
    assert parse_source(Source("again.surg", unparse(recipe))) == recipe
