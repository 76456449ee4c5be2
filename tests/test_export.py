"""ONNX vs PyTorch parity of the exported graph, with and without KV cache, and its structure."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import TINY, attention_layers, tiny_graph
from surgery.backend.verify import verify
from surgery.export.decoder import export_decoder
from surgery.export.options import ExportOptions
from surgery.front.planner import VERIFY_DECODE_STEPS
from surgery.models import builtin
from surgery.nodes.attention import NO_ROPE
from surgery.passes import DropAttention, DropBlock, DropMlp, run_pass

EDITS = {
    "none": [],
    "attention": [DropAttention(layers=(0, 3))],
    "mlp": [DropMlp(layers=(1, 5))],
    "block": [DropBlock(layers=(2, 4))],
    "mixed": [DropAttention(layers=(1,)), DropMlp(layers=(1, 3)), DropBlock(layers=(5,))],
}


def _export(arch: str, edit: str, tmp_path, kv_cache: bool = True, position_ids: bool = False):
    graph = tiny_graph(arch)
    for graph_pass in EDITS[edit]:
        if isinstance(graph_pass, DropAttention):
            graph_pass = DropAttention(layers=attention_layers(arch, graph_pass.layers))
        run_pass(graph_pass, graph)
    result = export_decoder(graph, str(tmp_path), ExportOptions(kv_cache=kv_cache, position_ids=position_ids))
    return graph, result


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("edit", EDITS)
def test_parity_with_kv_cache(arch, edit, tmp_path):
    graph, _ = _export(arch, edit, tmp_path)
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason
    assert check.kv_cache
    assert check.max_abs_logit_diff < 1e-4
    assert check.greedy_tokens_compared == 2 * VERIFY_DECODE_STEPS


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("edit", ["none", "mixed"])
def test_parity_with_explicit_position_ids(arch, edit, tmp_path):
    """`export onnx with position-ids`: RoPE from the input, outside GroupQueryAttention."""
    graph, result = _export(arch, edit, tmp_path, position_ids=True)
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason
    kept = len(result.kv_layers)
    rotated = sum(graph.layer(index).attention.rope != NO_ROPE for index in result.kv_layers)  # SmolLM3's NoPE
    splits = 2 if graph.index.latent_attention else 1  # latent attention splits its query and its latent
    convs = len(graph.conv_layers())  # a short convolution splits its projection too
    assert result.op_counts.get("RotaryEmbedding", 0) == 2 * rotated
    assert result.op_counts["Split"] == splits * kept + convs
    model = onnx.load(result.model_path, load_external_data=False)
    assert "position_ids" in [i.name for i in model.graph.input]


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("edit", ["none", "mixed"])
def test_parity_without_kv_cache(arch, edit, tmp_path):
    graph, _ = _export(arch, edit, tmp_path, kv_cache=False)
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1, kv_cache=False)
    assert check.passed, check.reason
    assert not check.kv_cache


def test_sliding_window_is_exercised():
    # tiny-mistral's window (8) is shorter than the verification prompts, so parity above
    # covers the window, not just full attention.
    assert builtin.tiny_config("tiny-mistral").sliding_window == 8


def test_dropped_parts_leave_nothing_in_the_graph(tmp_path):
    graph, result = _export("tiny-llama", "mixed", tmp_path)
    model = onnx.load(result.model_path, load_external_data=False)
    names = [node.name for node in model.graph.node] + [init.name for init in model.graph.initializer]
    assert not [n for n in names if "layers.1.self_attn" in n or "layers.1.input_layernorm" in n]
    assert not [n for n in names if "layers.1.mlp" in n or "layers.3.mlp" in n]
    assert not [n for n in names if "layers.5." in n]
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    kept = [0, 2, 3, 4]
    assert result.kv_layers == tuple(kept)
    # Positions come from the padded index inside GroupQueryAttention (the default export).
    assert inputs == ["input_ids", "attention_mask"] + [
        f"past_key_values.{slot}.{kind}" for slot in range(len(kept)) for kind in ("key", "value")
    ]
    assert outputs == [f"present.{slot}.{kind}" for slot in range(len(kept)) for kind in ("key", "value")] + ["logits"]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["surgery.kv_layers"]) == kept
    counts = result.op_counts
    assert counts["GroupQueryAttention"] == len(kept)
    assert "RotaryEmbedding" not in counts and "Split" not in counts  # packed QKV, rotary inside GQA


def test_dynamic_axes_and_external_data(tmp_path):
    _, result = _export("tiny-qwen3", "none", tmp_path)
    model = onnx.load(result.model_path, load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e.external_data[0].value == "model.onnx.data" for e in external)


def test_parameter_count_matches_the_graph(tmp_path):
    graph, result = _export("tiny-qwen2", "mixed", tmp_path)
    assert result.parameter_count == graph.parameter_count()


def _variant(architecture: str, **overrides):
    """A tiny random model of `architecture` with config fields the built-ins do not cover."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.ir.graph import DecoderGraph
    from surgery.models.index import ModelIndex

    base = builtin.tiny_config("tiny-llama").to_dict()
    fields = {
        k: base[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "initializer_range",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "max_position_embeddings",
        )
    }
    config = AutoConfig.for_model(architecture, **{**fields, **overrides})
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    index = ModelIndex.from_config(architecture, config)
    assert not index.unsupported_reasons()
    return DecoderGraph(model, index)


VARIANTS = {
    "llama3-rope": (
        "llama",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    ),
    "linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-sliding-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6,
         "layer_types": ["full_attention", "sliding_attention"] * 3},
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variants(variant, tmp_path):
    architecture, overrides = VARIANTS[variant]
    graph = _variant(architecture, **overrides)
    if variant == "qwen2-sliding-layers":
        assert [layer.sliding_window for layer in graph.layers] == [None, 6] * 3
    run_pass(DropAttention(layers=(2,)), graph)
    export_decoder(graph, str(tmp_path))
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason
