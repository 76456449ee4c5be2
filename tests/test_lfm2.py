"""LFM2: short-convolution layers in the attention's place, each with a fixed cache state.

pattern: the Hugging Face LFM2 model (its `conv` layers: in_proj -> B * x -> causal depthwise
convolution -> C * . -> out_proj); replacement: our ShortConv node and onnxruntime's
CausalConvWithState, its state an input and an output of the graph (`past.<slot>.conv`), numbered
after the KV slots; comparison: logits through the cache, genai's config, and `check`'s refusals
of statements about attention on convolution layers. (Parity against the Hugging Face model with
every edit, and genai's tokens, come with every tiny model: test_architectures, test_genai.)
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli, tiny_graph, write
from surgery.backend.runtime import OnnxCausalLM
from surgery.export.decoder import export_decoder
from surgery.export.genai import genai_config
from surgery.export.options import ExportOptions
from surgery.ir.inputs import position_ids_from_mask
from surgery.models.index import ModelIndex
from surgery.passes import DropAttention, DropBlock, run_pass

CONVS = (0, 2, 5)  # tiny-lfm2's convolution layers; attention in 1, 3 and 4


def test_the_index_knows_the_convolution_layers_and_lfm2s_mlp_width():
    from transformers import Lfm2Config

    index = ModelIndex.from_config("tiny-lfm2", tiny_graph("tiny-lfm2").config)
    assert index.conv_layers == CONVS and index.attention_layers == (1, 3, 4)
    assert index.intermediate_size == 160  # 240 -> two thirds, rounded up to a multiple of 32
    assert index.linear_names(0, "attention") == ["model.layers.0.conv.in_proj", "model.layers.0.conv.out_proj"]
    # LFM2-350M's config: 6656 nominal -> 4437 -> 4608 (a multiple of 256), as its MLP is built.
    lfm2_350m = Lfm2Config(hidden_size=1024, intermediate_size=6656, num_hidden_layers=16, num_attention_heads=16,
                           num_key_value_heads=8, full_attn_idxs=[2, 5, 8, 10, 12, 14], vocab_size=65536)  # fmt: skip
    index = ModelIndex.from_config("lfm2-350m", lfm2_350m)
    assert index.intermediate_size == 4608 and index.attention_layers == (2, 5, 8, 10, 12, 14)


def test_the_state_is_a_graph_input_numbered_after_the_kv_slots(tmp_path):
    graph = tiny_graph("tiny-lfm2")
    run_pass(DropAttention(layers=(3,)), graph)
    run_pass(DropBlock(layers=(2,)), graph)  # a convolution layer gone with its block: no state
    result = export_decoder(graph, str(tmp_path))
    model = onnx.load(result.model_path, load_external_data=False)
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert result.kv_layers == (1, 4)
    assert inputs["past.2.conv"] == inputs["past.3.conv"] == ["batch_size", 64, 2]  # layers 0 and 5
    assert "past.4.conv" not in inputs and result.op_counts["CausalConvWithState"] == 2
    config = genai_config(graph, result.context_length, True, False)["model"]
    assert config["type"] == "lfm2"
    decoder = config["decoder"]
    assert decoder["layer_types"] == ["full_attention", "full_attention", "conv", "conv"]
    assert decoder["num_hidden_layers"] == 4 and decoder["conv_cache_size"] == 2
    assert decoder["inputs"]["past_conv_names"] == "past.%d.conv"


def test_decoding_through_the_state_equals_the_whole_sequence(tmp_path):
    """Prefill, then one token at a time through onnxruntime's states, against PyTorch on the
    whole left-padded batch at once (no cache): the state carries exactly the window."""
    graph = tiny_graph("tiny-lfm2")
    export_decoder(graph, str(tmp_path))
    model = OnnxCausalLM(str(tmp_path), threads=1)
    ids = torch.tensor([[258, 258, 258, 72, 101, 108, 108, 111, 33, 40],
                        [87, 104, 97, 116, 32, 105, 115, 32, 105, 116]])  # fmt: skip
    mask = (ids != 258).long()
    expected = graph.forward(ids, mask, position_ids_from_mask(mask))
    out = model.step(ids[:, :6].numpy(), mask[:, :6].numpy(), position_ids_from_mask(mask[:, :6]).numpy())
    logits = [out.logits]
    for t in range(6, ids.shape[1]):
        out = model.step(ids[:, t : t + 1].numpy(), mask[:, : t + 1].numpy(), None, out.present)
        logits.append(out.logits)
    got = np.concatenate(logits, axis=1)
    real = mask.bool().numpy()
    assert np.abs(got[real] - expected.numpy()[real]).max() < 1e-4
    states = out.present[-len(CONVS) :]
    assert [tuple(s.shape()) for s in states] == [(2, 64, 2)] * 3


def test_without_the_state_the_window_is_lost(tmp_path):
    """Zeroing the state between steps changes the logits: the test above can fail."""
    graph = tiny_graph("tiny-lfm2")
    export_decoder(graph, str(tmp_path))
    model = OnnxCausalLM(str(tmp_path), threads=1)
    ids = np.array([[72, 101, 108, 108, 111, 33]])
    mask = np.ones_like(ids)
    prefill = model.step(ids[:, :5], mask[:, :5], None)
    kept = model.step(ids[:, 5:], mask, None, prefill.present)
    zeroed = prefill.present[: -len(CONVS)] + model.empty_cache(1)[-len(CONVS) :]
    lost = model.step(ids[:, 5:], mask, None, zeroed)
    assert np.abs(kept.logits - lost.logits).max() > 1e-3


@pytest.mark.parametrize(
    ("statement", "what"),
    [
        ("drop attention layers 0", "drop attention"),
        ("drop heads 1 of layers 1..2", "drop heads"),
        ("quantize kv-cache layers 5 to int8", "quantize kv-cache"),
    ],
)
def test_statements_about_attention_are_refused_on_a_convolution_layer(statement, what, in_tmp):
    result = run_cli("check", write(in_tmp / "r.surg", f'model "tiny-lfm2"\n{statement}\n'))
    assert result.code == 1
    assert "mix tokens with a short convolution, not attention: " + what + " does not apply there" in result.err
    assert "hint: the layers with attention are 1, 3..4" in result.err


def test_importance_drops_only_attention_and_every_attention_cannot_go(in_tmp):
    result = run_cli("plan", write(in_tmp / "r.surg", 'model "tiny-lfm2"\ndrop attention least important 2 by zd\n'))
    assert result.code == 0, result.err
    steps = json.loads(run_cli("plan", str(in_tmp / "r.surg"), "--json").out)["steps"]
    drop = next(step for step in steps if step["action"] == "drop attention")
    assert len(drop["layers"]) == 2 and set(drop["layers"]) <= {1, 3, 4}
    assert "2 of 3 candidates" in drop["parameters"]["selected_by"]
    result = run_cli("check", write(in_tmp / "all.surg", 'model "tiny-lfm2"\ndrop attention layers 1, 3..4\n'))
    assert "this drops the attention of every layer (3 of 3)" in result.err


def test_speculative_decoding_is_refused(in_tmp):
    result = run_cli("check", write(in_tmp / "r.surg", 'model "tiny-lfm2"\ndraft { drop block layers 1..4 }\n'))
    assert result.code == 1 and "a short convolution's state cannot be rewound" in result.err


def test_int4_quantizes_the_convolution_projections(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "tiny-lfm2"\nquantize layers to int4\nexport onnx\n')
    result = run_cli("apply", recipe, "-o", str(in_tmp / "out"))
    assert result.code == 0, result.err
    model = onnx.load(str(in_tmp / "out" / "model.onnx"), load_external_data=False)
    quantized = {node.input[1] for node in model.graph.node if node.op_type == "MatMulNBits"}  # packed weights
    assert {f"model.layers.{i}.conv.{p}.weight_Q4" for i in CONVS for p in ("in_proj", "out_proj")} <= quantized


def test_lfm2_moe_selects_experts_with_its_bias_and_mixes_them_without(tmp_path):
    """LFM2-MoE's router: the selection bias decides which experts run (without it the logits move),
    and the exported router (sigmoid, biased top-k, renormalized, scaled) matches the block's."""
    graph = tiny_graph("tiny-lfm2-moe")
    assert graph.index.num_experts == 4 and graph.index.conv_layers == CONVS
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    reference = graph.forward(ids, mask, position_ids_from_mask(mask))
    block = graph.layer(1).mlp.block
    bias = block.expert_bias.clone()
    block.expert_bias.zero_()
    assert (graph.forward(ids, mask, position_ids_from_mask(mask)) - reference).abs().max() > 1e-3
    block.expert_bias.copy_(bias)
    from surgery.backend.verify import verify
    from surgery.front.planner import VERIFY_DECODE_STEPS
    from surgery.models import builtin

    export_decoder(graph, str(tmp_path))
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed and check.max_abs_logit_diff < 1e-4, check.reason


def test_lfm2_moe_experts_are_not_pruned(in_tmp):
    result = run_cli("check", write(in_tmp / "r.surg", 'model "tiny-lfm2-moe"\nprune experts layers 1..2 to 2\n'))
    assert result.code == 1
    assert "lfm2_moe's experts (routed by sigmoid scores chosen with a bias, not a softmax top-k)" in result.err


def test_genai_replays_no_cuda_graph_over_a_convolution_state(tmp_path):
    """genai's CUDA graphs do not carry the convolution state between decode steps (measured on an
    H100: tokens part from Hugging Face's at the third); a CUDA export of LFM2 leaves them off."""
    from surgery.executor.export import cuda_provider_options

    graph = tiny_graph("tiny-lfm2")
    options = ExportOptions(target="cuda", cuda_graphs=True)
    result = export_decoder(graph, str(tmp_path), options)
    assert cuda_provider_options(options, result.op_counts) == {}
    (tmp_path / "llama").mkdir()
    llama = export_decoder(tiny_graph("tiny-llama"), str(tmp_path / "llama"), options)
    assert cuda_provider_options(options, llama.op_counts) == {"enable_cuda_graph": "1"}
