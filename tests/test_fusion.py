"""Layer Fused Decoding: the exported graph against PyTorch and against the formula itself.

pattern: the unfused model; replacement: `fuse layer ...` applied to the decoder graph and
exported; comparison: (1) PyTorch's reference forward on the same inputs (left-padded batch,
KV cache), (2) the logit-space formula `(1 - a) logits + a W_head FinalNorm(h_l)` computed from
the Hugging Face model's own hidden states, (3) for weight 0, the unfused export itself.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import TINY, attention_layers, run_cli, tiny_graph, write
from surgery.backend.runtime import OnnxCausalLM
from surgery.backend.verify import verify
from surgery.calibration import CalibrationSpec, calibration_tokens
from surgery.export.decoder import export_decoder
from surgery.front.planner import VERIFY_DECODE_STEPS
from surgery.importance.measures import iks_scores
from surgery.models import builtin
from surgery.nodes.fusion import jsd
from surgery.passes import DropAttention, Fuse, PassContractError, run_pass

IDS = np.array([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33]])


def _fused(arch: str, fuse: Fuse, tmp_path):
    graph = tiny_graph(arch)
    run_pass(DropAttention(layers=attention_layers(arch, (2,))), graph)
    run_pass(fuse, graph)
    return graph, export_decoder(graph, str(tmp_path))


# `check` refuses fusion into a soft-capped head (Gemma 2): its readouts do not mix linearly.
FUSABLE = tuple(name for name in TINY if getattr(builtin.tiny_config(name), "final_logit_softcapping", None) is None)


@pytest.mark.parametrize("arch", FUSABLE)
@pytest.mark.parametrize(
    "fuse",
    [Fuse(layers=(3,), weight=0.4), Fuse(layers=(1, 2, 3, 4), weight=0.6, dynamic=True)],
    ids=["static", "dynamic"],
)
def test_parity_with_pytorch_with_kv_cache(arch, fuse, tmp_path):
    graph, _ = _fused(arch, fuse, tmp_path)
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason
    assert check.kv_cache and check.max_abs_logit_diff < 1e-4


@pytest.mark.parametrize("weight", [0.25, 0.75])
def test_static_fusion_is_the_logit_space_formula(weight, tmp_path):
    graph, _ = _fused("tiny-qwen2", Fuse(layers=(3,), weight=weight), tmp_path)
    model = tiny_graph("tiny-qwen2").model  # a fresh copy, with attention 2 removed by a hook
    model.model.layers[2].self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(IDS), output_hidden_states=True)
        h3 = out.hidden_states[4]  # hidden_states[0] is the embedding output
        expected = (1 - weight) * out.logits + weight * model.lm_head(model.model.norm(h3))
    session = OnnxCausalLM(str(tmp_path))
    actual = session.step(IDS, np.ones_like(IDS), np.arange(IDS.shape[1])[None]).logits
    assert np.abs(actual - expected.numpy()).max() < 1e-4


def test_static_fusion_costs_one_norm_and_one_add(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    unfused = export_decoder(tiny_graph("tiny-llama"), str(tmp_path / "a"))
    graph = tiny_graph("tiny-llama")
    run_pass(Fuse(layers=(3,), weight=0.5), graph)
    fused = export_decoder(graph, str(tmp_path / "b"))
    norms = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
    delta = {
        op: fused.op_counts.get(op, 0) - unfused.op_counts.get(op, 0)
        for op in set(fused.op_counts) | set(unfused.op_counts)
    }
    assert sum(delta.get(op, 0) for op in norms) == 1
    assert delta.get("Add", 0) == 1
    assert {op: d for op, d in delta.items() if d and op not in norms and op != "Add"} == {}  # nothing else
    assert fused.op_counts["MatMul"] == unfused.op_counts["MatMul"]  # one vocabulary projection
    assert fused.parameter_count == unfused.parameter_count


def test_weight_zero_is_the_unfused_model_exactly(in_tmp):
    base = write(in_tmp / "a.surg", 'model "tiny-mistral"\ndrop mlp layers 1\n')
    zero = write(in_tmp / "b.surg", 'model "tiny-mistral"\ndrop mlp layers 1\nfuse layer 3 into head weight 0\n')
    assert run_cli("apply", base, "-o", "a").code == 0
    result = run_cli("apply", zero, "-o", "b")
    assert result.code == 0, result.err
    a, b = onnx.load("a/model.onnx", load_external_data=False), onnx.load("b/model.onnx", load_external_data=False)
    assert a.graph == b.graph
    assert (in_tmp / "a" / "model.onnx.data").read_bytes() == (in_tmp / "b" / "model.onnx.data").read_bytes()


def test_dynamic_fusion_reports_the_layer_it_fused(tmp_path):
    graph, _ = _fused("tiny-llama", Fuse(layers=(1, 3, 4), weight=0.5, dynamic=True), tmp_path)
    mask = torch.ones(1, IDS.shape[1], dtype=torch.long)
    graph.forward(torch.from_numpy(IDS), mask, torch.arange(IDS.shape[1])[None])
    expected = graph.last_choice.layer.numpy()
    out = OnnxCausalLM(str(tmp_path)).step(IDS, mask.numpy(), np.arange(IDS.shape[1])[None])
    assert out.fused_layer is not None and set(np.unique(out.fused_layer)) <= {1, 3, 4}
    scores = graph.last_choice.iks.numpy()[0]
    for position, (ours, theirs) in enumerate(zip(expected[0], out.fused_layer[0], strict=True)):
        # the same layer, or one whose IKS ties with it
        assert (
            ours == theirs
            or abs(scores[position, [1, 3, 4].index(ours)] - scores[position, [1, 3, 4].index(theirs)]) < 1e-5
        )


def test_iks_matches_hooks_on_the_hf_model():
    graph = tiny_graph("tiny-llama")
    tokens = calibration_tokens(builtin.byte_tokenizer(), CalibrationSpec(samples=3, length=40, seed=2))
    scores = iks_scores(graph, tokens, max_tokens=80).scores["block"]  # the first two samples
    model = graph.model
    before, after = {}, {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(
            layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: before.__setitem__(i, a[0]))
        )
        handles.append(
            layer.register_forward_hook(
                lambda m, a, out, i=i: after.__setitem__(i, out[0] if isinstance(out, tuple) else out)
            )
        )
    totals = np.zeros(len(model.model.layers))
    with torch.no_grad():
        for sample in tokens[:2]:
            model(input_ids=torch.from_numpy(sample)[None])
            for i in before:
                readout = lambda h: torch.log_softmax(model.lm_head(model.model.norm(h)), -1)  # noqa: E731
                totals[i] += float(jsd(readout(before[i]), readout(after[i])).sum())
    for handle in handles:
        handle.remove()
    assert scores == pytest.approx(list(totals / 80), abs=1e-5)


def test_fuse_pass_contract():
    graph = tiny_graph("tiny-llama")
    with pytest.raises(PassContractError, match="last layer"):
        run_pass(Fuse(layers=(5,), weight=0.5), graph)


def test_plan_rejects_fusing_a_layer_an_importance_drop_removed(in_tmp):
    scores = {"format": "surgery-importance", "version": 1,
              "metrics": {"m": {"more_important": "higher", "scores": {"block": [9, 9, 9, 0, 9, 9]}}}}  # fmt: skip
    write(in_tmp / "imp.json", json.dumps(scores))
    recipe = write(
        in_tmp / "r.surg", 'model "tiny-llama"\ndrop block least important 1 by "imp.json"\nfuse layer 3 into head\n'
    )
    result = run_cli("plan", recipe)
    assert result.code == 1
    assert "r.surg:3:1: error: layer 3 cannot be fused: its block is dropped" in result.err


def test_auto_picks_the_lowest_iks_candidate(in_tmp, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(in_tmp / "cache"))
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-llama"\ncalibrate on "valid" samples 2 length 32\n'
        "fuse layer auto into head weight 0.5 candidates 1..4\n",
    )
    result = run_cli("plan", recipe, "--json")
    assert result.code == 0, result.err
    steps = json.loads(result.out)["steps"]
    fuse = next(s for s in steps if s["action"] == "fuse")
    scores = {int(k): v for k, v in fuse["parameters"]["scores"].items()}
    assert set(scores) == {1, 2, 3, 4}
    assert fuse["layers"] == [min(scores, key=scores.get)]
    assert steps[0]["parameters"]["metrics"] == ["iks"]
