"""Importance metrics against separate, plain computations.

similarity and LIM: forward hooks on the Hugging Face model itself record each decoder
layer's input and output and the residual entering post_attention_layernorm (= after
attention); the cosines are taken here with numpy. ZD: numpy over the layers' weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli, tiny_graph, write
from surgery import architectures
from surgery.calibration import CalibrationSpec, calibration_tokens
from surgery.front.selection import ImportanceQuery, ScoreSource, ranking, resolve_query
from surgery.importance.file import load_importance
from surgery.importance.measures import lim_scores, residual_statistics, similarity_scores, zd_scores
from surgery.importance.metrics import MetricScores
from surgery.models import builtin

SPEC = CalibrationSpec(samples=6, length=48, seed=3)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _hooked_residuals(model, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    """x, m, h of every layer, recorded by hooks on the HF model (one batch)."""
    records: list[dict[str, np.ndarray]] = [{} for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):

        def before(module, args, kwargs, i=i):
            records[i]["x"] = kwargs.get("hidden_states", args[0] if args else None).detach().numpy().copy()

        def after(module, args, kwargs, output, i=i):
            records[i]["h"] = (output[0] if isinstance(output, tuple) else output).detach().numpy().copy()

        def norm_input(module, args, i=i):
            records[i]["m"] = args[0].detach().numpy().copy()

        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after, with_kwargs=True))
        # m enters the MLP sub-block: its pre-norm, or the MLP itself where the family has none.
        arch = architectures.lookup(model.config.model_type)
        entry = arch.names.mlp if arch.norms.placement == "post" else arch.names.mlp_pre_norm
        handles.append(getattr(layer, entry).register_forward_pre_hook(norm_input))
    try:
        with torch.no_grad():
            ids = torch.from_numpy(tokens)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    return records


@pytest.mark.parametrize("name", TINY)
def test_similarity_and_lim_match_hooks_on_the_hf_model(name):
    graph = tiny_graph(name)
    tokens = calibration_tokens(builtin.byte_tokenizer(), SPEC)
    assert tokens.shape == (6, 48)
    statistics = residual_statistics(graph, tokens, batch_size=4)  # two uneven batches on purpose
    similarity, lim = similarity_scores(statistics), lim_scores(statistics)
    records = _hooked_residuals(graph.model, tokens)
    for i, r in enumerate(records):
        assert similarity.scores["attention"][i] == pytest.approx(_cos(r["x"], r["m"]).mean(), abs=1e-4)
        assert similarity.scores["mlp"][i] == pytest.approx(_cos(r["m"], r["h"]).mean(), abs=1e-4)
        assert similarity.scores["block"][i] == pytest.approx(_cos(r["x"], r["h"]).mean(), abs=1e-4)
        previous = records[i - 1]["h"] if i else r["x"]  # h_{-1} is the embedding output
        assert lim.scores["block"][i] == pytest.approx(-_cos(previous, r["h"]).mean(), abs=1e-4)
    assert similarity.more_important == "lower" and lim.more_important == "higher"


def test_calibration_is_seeded_and_checked():
    tokenizer = builtin.byte_tokenizer()
    first = calibration_tokens(tokenizer, SPEC)
    assert np.array_equal(first, calibration_tokens(tokenizer, SPEC))
    assert not np.array_equal(first, calibration_tokens(tokenizer, CalibrationSpec(samples=6, length=48, seed=4)))


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_zd_matches_numpy(threshold):
    graph = tiny_graph("tiny-qwen2")
    zd = zd_scores(graph, threshold)
    for i, layer in enumerate(graph.model.model.layers):
        attn = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj]
        mlp = [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        for part, modules in (("attention", attn), ("mlp", mlp), ("block", attn + mlp)):
            w = np.concatenate([m.weight.detach().numpy().ravel().astype(np.float64) for m in modules])
            z = (w - w.mean()) / w.std()
            assert zd.scores[part][i] == pytest.approx((z > threshold).mean(), abs=1e-12)
    assert zd.parameters == {"threshold": threshold}


def _scores(values, direction="higher") -> MetricScores:
    return MetricScores("m", direction, {"block": tuple(values)}, {})


def test_ranking_direction_ties_and_percent_rounding():
    scores = _scores([0.5, 0.9, 0.5, 0.1, float("nan"), 0.7])
    assert ranking(scores, "block", list(range(6))) == [1, 5, 0, 2, 3]  # nan has no rank; tie: lower first
    lower = _scores([0.5, 0.9, 0.5, 0.1, 0.3, 0.7], "lower")
    assert ranking(lower, "block", list(range(6))) == [3, 4, 0, 2, 5, 1]

    def query(rank, count=None, percent=None):
        return ImportanceQuery(rank, count, percent, ScoreSource("m"), "block")

    values = _scores([float(v) for v in range(30)])
    assert resolve_query(query("most", percent=25), values, list(range(30))) == tuple(range(22, 30))  # 7.5 -> 8
    assert resolve_query(query("least", count=3), values, list(range(30))) == (0, 1, 2)
    # candidates: layers an earlier statement removed are not ranked
    assert resolve_query(query("least", count=3), values, [1, 5, 7, 9]) == (1, 5, 7)


def test_importance_cli_writes_a_valid_file_and_plot(in_tmp):
    result = run_cli(
        "importance", "--model", "tiny-llama", "--metric", "similarity,lim,zd", "--samples", "4",
        "--seq-len", "32", "--zd-threshold", "0.5", "-o", "imp.json", "--plot", "imp.png", "--no-cache",
    )  # fmt: skip
    assert result.code == 0, result.err
    importance, problems = load_importance("imp.json", layers=6)
    assert not problems
    assert list(importance.metrics) == ["similarity", "lim", "zd"]
    data = json.loads((in_tmp / "imp.json").read_text())
    assert data["format"] == "surgery-importance" and data["version"] == 1
    assert data["model"] == {"spec": "tiny-llama", "architecture": "llama", "layers": 6}
    calibration = data["provenance"]["calibration"]
    assert (calibration["name"], calibration["samples"], calibration["length"], calibration["seed"]) == (
        "wikitext-2-valid", 4, 32, 0,
    )  # fmt: skip
    assert data["metrics"]["zd"]["parameters"] == {"threshold": 0.5}
    assert data["metrics"]["lim"]["more_important"] == "higher"
    assert (in_tmp / "imp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_importance_cli_refuses_unknown_metrics(in_tmp):
    result = run_cli("importance", "--model", "tiny-llama", "--metric", "simlarity", "-o", "x.json")
    assert result.code == 1 and "unknown metric(s) simlarity" in result.err


COMPUTED = """model "tiny-llama"
calibrate on "valid" samples 4 length 32 seed 1
drop attention least important 2 by similarity
quantize layers most important 50% by lim to int8
quantize mlp least important 1 by zd to int4 block 16
"""


def test_recipe_selectors_use_scores_computed_once_and_cached(in_tmp, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(in_tmp / "cache"))
    from surgery.importance.compute import ScoreRequest, compute_importance
    from surgery.models.specs import resolve_spec

    graph = tiny_graph("tiny-llama")
    request = ScoreRequest(("similarity", "lim", "zd"), CalibrationSpec("valid", 4, 32, 1))
    direct = compute_importance(graph, builtin.byte_tokenizer(), resolve_spec("tiny-llama"), request, use_cache=False)
    attention = direct.metrics["similarity"].scores["attention"]
    dropped = sorted(sorted(range(6), key=lambda i: -attention[i])[:2])  # highest similarity = least important
    lim = direct.metrics["lim"].scores["block"]
    int8 = sorted(sorted(range(6), key=lambda i: -lim[i])[:3])
    zd_mlp = direct.metrics["zd"].scores["mlp"]
    int4 = [max(range(6), key=lambda i: zd_mlp[i])]  # zd: lower = more important

    recipe = write(in_tmp / "r.surg", COMPUTED)
    plan = run_cli("plan", recipe, "--json")
    assert plan.code == 0, plan.err
    steps = json.loads(plan.out)["steps"]
    assert steps[0]["action"] == "compute importance" and steps[0]["parameters"]["metrics"] == [
        "similarity",
        "lim",
        "zd",
    ]
    assert steps[1]["layers"] == dropped
    quantize = [s for s in steps if s["action"] == "quantize"]
    assert quantize[0]["layers"] == int8 and quantize[1]["layers"] == int4
    assert "importance: similarity, lim, zd (cached)" not in plan.err  # computed by `plan` the first time

    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    assert report["model"]["after"]["attention_layers"] == [i for i in range(6) if i not in dropped]
    assert report["importance"]["metrics"]["similarity"]["scores"]["attention"] == pytest.approx(attention, abs=1e-6)
    # `quantize mlp ... to int4` comes later, so it wins over int8 for that layer's MLP.
    int8_linears = sum((2 if layer not in dropped else 0) + (3 if layer not in int4 else 0) for layer in int8)
    widths = report["quantization"]["widths"]
    assert (widths["int8"]["linears"], widths["int4"]["linears"]) == (int8_linears, 3)
    assert "(cached)" in result.err  # `plan` computed the scores; `apply` read them back


def test_scores_one_command_computed_are_read_by_the_next(in_tmp, monkeypatch):
    """`plan` computes similarity; its pass gives lim too, so `surgery importance` of similarity,
    lim and zd computes only zd (issue 25: it used to recompute all three)."""
    monkeypatch.setenv("SURGERY_CACHE", str(in_tmp / "cache"))
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n'
                                      "drop attention least important 2 by similarity\n")  # fmt: skip
    assert run_cli("plan", recipe).code == 0
    result = run_cli("importance", "--model", "tiny-llama", "--metric", "similarity,lim,zd", "--samples", "8",
                     "--seq-len", "64", "-o", "scores.json")  # fmt: skip
    assert result.code == 0, result.err
    assert "importance: similarity, lim (cached)" in result.err
    assert "importance: similarity, lim on" not in result.err and "importance: zd" in result.err
    again = run_cli("importance", "--model", "tiny-llama", "--metric", "zd,lim", "--samples", "8", "--seq-len", "64",
                    "-o", "again.json")  # fmt: skip
    assert "importance: zd, lim (cached)" in again.err
    first, second = (json.loads((in_tmp / name).read_text())["metrics"] for name in ("scores.json", "again.json"))
    assert first["lim"] == second["lim"] and first["zd"] == second["zd"]
