"""The families added for issue 29 beyond the parity every tiny model gets (test_architectures,
test_genai, test_layerwise): what each one's new component does, and what `check` refuses.

pattern: the Hugging Face model of each family; replacement: our description's nodes and their
ONNX; comparison: logits, and the recipe diagnostics where a statement cannot apply.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_graph, write
from surgery.analysis.mixed_precision import tensor_shapes
from surgery.backend.verify import verify
from surgery.export.decoder import export_decoder
from surgery.export.options import ExportOptions
from surgery.front.planner import VERIFY_DECODE_STEPS
from surgery.models import builtin
from surgery.nodes.attention import apply_rotary


@pytest.mark.parametrize("operator", ["contrib", "plain"])
@pytest.mark.parametrize(
    ("name", "moe_layers"),
    [
        ("tiny-gpt-oss", 6),  # the clamped SwiGLU with biases (onnxruntime's MoE operator takes its constants)
        ("tiny-deepseek-v2-moe", 5),  # scaled, unrenormalized weights and a shared expert, after one dense layer
        ("tiny-lfm2-moe", 5),  # sigmoid scores chosen with a bias: the operator fed their logs, its output rescaled
    ],
)
def test_unusual_experts_match_in_both_moe_forms(name, moe_layers, operator, tmp_path):
    """onnxruntime's MoE operator and plain ops, each against PyTorch."""
    graph = tiny_graph(name)
    result = export_decoder(graph, str(tmp_path), ExportOptions(moe_operator=operator))
    assert result.op_counts.get("MoE", 0) == (moe_layers if operator == "contrib" else 0)
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed and check.max_abs_logit_diff < 1e-4, check.reason


def test_gpt_oss_sinks_and_clamp_change_the_model():
    """Without its sinks or with an unclamped SwiGLU the tiny model's logits move: the parity tests
    that pass with them can fail."""
    graph = tiny_graph("tiny-gpt-oss")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    mask, positions = torch.ones_like(ids), torch.arange(12)[None]
    reference = graph.forward(ids, mask, positions)
    attention = graph.layer(0).attention
    sinks, attention.sinks = attention.sinks, None
    assert (graph.forward(ids, mask, positions) - reference).abs().max() > 1e-3
    attention.sinks = sinks
    experts = graph.layer(0).mlp.experts
    limit, experts.limit = experts.limit, 1e9
    assert (graph.forward(ids, mask, positions) - reference).abs().max() > 1e-3
    experts.limit = limit


@pytest.mark.parametrize(
    ("model", "statement", "why"),
    [
        ("tiny-gpt-oss", "prune experts layers 0..1 to 2", "gpt_oss's experts (biased, with a clamped SwiGLU)"),
        ("tiny-gpt-oss", "merge experts layers 0..1 to 2", "gpt_oss's experts (biased, with a clamped SwiGLU)"),
        ("tiny-phimoe", "prune experts layers 0..1 to 2", "phimoe's experts (routed by SparseMixer, not a softmax"),
    ],
)  # fmt: skip
def test_unmodelled_experts_are_refused_at_the_statement(model, statement, why, in_tmp):
    recipe = write(in_tmp / "r.surg", f'model "{model}"\n{statement}\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert f"r.surg:2:1: error: {why}" in result.err


def test_interleaved_rope_turns_adjacent_pairs():
    """GLM's RoPE: dimensions (2i, 2i + 1) turn together by frequency i, and a pair keeps its norm."""
    x = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    angles = torch.rand(1, 3, 4, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    turned = apply_rotary(x, cos, sin, interleaved=True)
    pairs, turned_pairs = x.reshape(1, 1, 3, 4, 2), turned.reshape(1, 1, 3, 4, 2)
    assert torch.allclose(pairs.norm(dim=-1), turned_pairs.norm(dim=-1))
    a, b = pairs[..., 0], pairs[..., 1]
    assert torch.allclose(turned_pairs[..., 0], a * angles.cos()[:, None] - b * angles.sin()[:, None])
    assert not torch.allclose(turned, apply_rotary(x, cos, sin))  # halves would be another model


def test_hunyuan_rotates_by_true_positions_under_left_padding(tmp_path):
    """Q/K norms after RoPE make the padded index and the true position differ: the export counts
    positions from the mask, so a left-padded row equals the same row alone."""
    from surgery.backend.runtime import OnnxCausalLM

    graph = tiny_graph("tiny-hunyuan")
    export_decoder(graph, str(tmp_path))
    model = OnnxCausalLM(str(tmp_path))
    ids = np.array([[258, 258, 72, 105, 33], [84, 104, 101, 32, 99]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    padded = model.step(ids, mask, None).logits[0, 2:]
    alone = model.step(ids[:1, 2:], mask[:1, 2:], None).logits[0]
    assert np.abs(padded - alone).max() < 1e-4


def test_nemotron_has_no_gate_projection_to_size_or_quantize():
    graph = tiny_graph("tiny-nemotron")
    assert not graph.index.mlp_gated and "model.layers.0.mlp.gate_proj" not in graph.index.linear_names(0, "mlp")
    shapes = tensor_shapes(graph.index, {"attention": (0,), "mlp": (0,)})
    mlp = [shape.name for shape in shapes if ".mlp." in shape.name]
    assert mlp == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_nemotron_layernorm_bias_survives_layer_fusion(in_tmp):
    """Static fusion scales the final norm's gain by its weight: the bias must scale with it."""
    recipe = write(in_tmp / "r.surg", 'model "tiny-nemotron"\nfuse layer 3 into head weight 0.3\n')
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    assert "verification: max |logit diff|" in result.out


def test_a_description_change_is_what_makes_each_family(tmp_path):
    """Each new flag is load-bearing: switched off, the family's description no longer reproduces it."""
    from surgery import architectures
    from surgery.architectures.conformance import first_difference
    from surgery.ir.graph import DecoderGraph
    from surgery.models.index import ModelIndex

    for name, field in (("tiny-glm", "rope_interleaved"), ("tiny-hunyuan", "qk_norm_after_rope")):
        model = builtin.tiny_model(name)
        index = ModelIndex.from_config(name, model.config)
        arch = architectures.lookup(index.architecture)
        wrong = dataclasses.replace(arch, attention=dataclasses.replace(arch.attention, **{field: False}))
        assert first_difference(model, DecoderGraph(model, index, wrong)) is not None, name


def test_latent_attention_caches_the_latent(tmp_path):
    """One KV head of rope + rank per layer: 2 x 48 numbers per token where a plain-attention export
    of the same model would cache 4 heads x (16 + 16) keys and 4 x 16 values."""
    from surgery.backend.runtime import OnnxCausalLM
    from surgery.formats.kv_cache import cache_bytes_per_token

    graph = tiny_graph("tiny-deepseek-v2")
    export_decoder(graph, str(tmp_path))
    shapes = {i.name: i.shape for i in OnnxCausalLM(str(tmp_path)).session.get_inputs()}
    assert shapes["past_key_values.0.key"][1:] == [1, "past_sequence_length", 48]
    assert shapes["past_key_values.0.value"][1:] == [1, "past_sequence_length", 48]
    layers = {i: (a.num_kv_heads, a.head_dim, None) for i in graph.kv_layers() if (a := graph.layer(i).attention)}
    ours = cache_bytes_per_token(layers, 4)
    assert ours == 6 * 2 * 48 * 4
    plain = 6 * (4 * (16 + 16) + 4 * 16) * 4
    assert plain / ours == 2.0


def test_deepseek_experts_and_latent_heads_are_refused_at_the_statement(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "tiny-deepseek-v2-moe"\nprune experts layers 1..2 to 2\n'
                                      "drop heads 0 of layers 1\nquantize attention to int8\n")  # fmt: skip
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:2:1: error: deepseek_v2's experts (scaled routing weights and always-on shared experts)" in (
        result.err
    )
    assert "r.surg:3:12: error: cannot drop query heads 0: multi-head latent attention's heads share one latent" in (
        result.err
    )
    assert "r.surg:4:1: error: quantizing multi-head latent attention is not supported yet" in result.err


def test_sparsemixer_routes_unlike_a_softmax_top_two():
    """Phi-MoE's routing weights are not a renormalized softmax top-2: the parity tests against
    Hugging Face would fail if the router were emitted as one."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from surgery.ir.graph import DecoderGraph
    from surgery.models.index import ModelIndex

    model = builtin.tiny_model("tiny-phimoe")
    scores = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    weights, chosen = sparsemixer(scores, jitter_eps=0.3, training=False)
    top = torch.softmax(scores, -1).topk(2, -1)
    renormalized = top.values / top.values.sum(-1, keepdim=True)
    assert torch.equal(chosen, top.indices) and not torch.allclose(weights, renormalized)
    graph = DecoderGraph(model, ModelIndex.from_config("tiny-phimoe", model.config))
    assert graph.layer(0).mlp.gate is model.model.layers[0].mlp.router


def _mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of (experts, in, out) weights in gpt-oss's MXFP4 checkpoint layout: per
    output row, blocks of 32 inputs share a power-of-two scale; codes are the nearest e2m1 value."""
    from surgery.models.conversion import FP4_VALUES

    rows = weight.transpose(1, 2).reshape(weight.shape[0], weight.shape[2], -1, 32)  # (e, out, groups, 32)
    exponent = torch.ceil(torch.log2(rows.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    scaled = rows / torch.exp2(exponent)[..., None]
    table = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs()[..., None] - table).abs().argmin(-1) + 8 * (scaled < 0)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_checkpoint_loads_a_layer_at_a_time(tmp_path):
    """Experts stored as MXFP4 blocks and scales: the lazy load dequantizes one layer's when it
    loads, to the values transformers' own (whole-model) dequantization gives."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from surgery.models.loading import load_model
    from surgery.models.specs import resolve_spec

    folder = tmp_path / "gpt-oss-mxfp4"
    model = builtin.tiny_model("tiny-gpt-oss")
    model.save_pretrained(folder)
    builtin.byte_tokenizer().save_pretrained(folder)
    tensors = {}
    for name, param in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = _mxfp4(param)
        else:
            tensors[name] = param.contiguous()
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # dequantized whole
    lazy_model, _, weights = load_model(resolve_spec(str(folder)), lambda *_: None, lazy=True)
    assert weights is not None  # a layer at a time, not the whole model
    name = "model.layers.2.mlp.experts.gate_up_proj"
    assert dict(lazy_model.named_parameters())[name].device.type == "meta"
    loaded = weights.load(name)
    assert torch.equal(loaded, dict(reference.named_parameters())[name].float())
    original = dict(model.named_parameters())[name]
    assert 0 < (loaded - original).abs().max() < 0.25 * original.abs().max()  # really quantized, and close
    recipe = write(tmp_path / "r.surg", f'model "{folder}"\ndrop attention layers 1\n')
    result = run_cli("apply", recipe, "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    assert "verification (teacher-forced, layer by layer): max |logit diff|" in result.out  # streamed


def test_dropping_gpt_oss_heads_takes_their_sinks(in_tmp):
    """A dropped query head's sink logit goes with it: the export still matches PyTorch."""
    recipe = write(in_tmp / "r.surg", 'model "tiny-gpt-oss"\ndrop heads 0, 2 of layers 1..2\n')
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    assert "max |logit diff|" in result.out and "greedy tokens agree 16/16" in result.out
    graph = tiny_graph("tiny-gpt-oss")
    from surgery.passes.drop_heads import drop_query_heads

    attention = graph.layer(1).attention
    sinks = attention.sinks.detach().clone()
    drop_query_heads(attention, (0, 2))
    assert torch.equal(attention.sinks, sinks[[1, 3]])


def test_a_latent_head_wider_than_cuda_takes_is_refused_for_cuda(in_tmp):
    """DeepSeek-V2-Lite's cache head is 64 + 512 = 576 wide; onnxruntime's CUDA GroupQueryAttention
    takes 512 at most (measured on an H100), so `for cuda` is refused at check, from the config."""
    from transformers import DeepseekV2Config

    DeepseekV2Config(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
                     q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     head_dim=64).save_pretrained(in_tmp / "lite")  # fmt: skip
    recipe = write(in_tmp / "r.surg", 'model "lite"\nexport onnx for cuda\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:2:1: error: this model's attention heads are 576 wide (latent attention" in result.err
    assert run_cli("check", write(in_tmp / "c.surg", 'model "lite"\nexport onnx\n')).code == 0


def test_a_known_unsupported_family_gets_its_reason_not_a_near_name(in_tmp):
    """InternLM 2's config names remote code, which transformers will not read without running it:
    the refusal says why, not "cannot read the config" or a near name."""
    import json

    (in_tmp / "internlm2").mkdir()
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "num_hidden_layers": 2,
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}}  # fmt: skip
    (in_tmp / "internlm2" / "config.json").write_text(json.dumps(config))
    result = run_cli("check", write(in_tmp / "r.surg", 'model "internlm2"\n'))
    assert result.code == 1
    assert "architecture 'internlm2' is not supported (it loads only as remote code, which surgery never runs)" in (
        result.err
    )
    assert "did you mean" not in result.err
