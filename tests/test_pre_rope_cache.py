"""`quantize kv-cache to int4 pre-rope`: keys stored before RoPE with a per-channel offset, in
an attention graph of our own; it matches PyTorch in onnxruntime on every family it fits,
prefill, decode and left padding, and its codes are the format's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import TINY, applied, prefill_and_decode_match, run_cli, tiny_graph
from surgery.analysis.kv_calibration import kv_quantizations
from surgery.backend.runtime import OnnxCausalLM
from surgery.backend.verify_cache import unpack_codes
from surgery.export.decoder import export_decoder
from surgery.formats.kv_cache import KVCacheFormat
from surgery.front.statements.kv_cache import pre_rope_problem
from surgery.passes import QuantizeKVCache, run_pass

PRE4, PRE8 = KVCacheFormat.of(4, "pre-rope"), KVCacheFormat.of(8, "pre-rope")
FITS = tuple(name for name in TINY if not pre_rope_problem(tiny_graph(name).index))


def test_the_format_is_a_record_of_its_own():
    assert PRE4.granularity == "pre-rope" and PRE4.before_rope and not PRE4.native
    assert KVCacheFormat.from_json(PRE4.to_json()) == PRE4
    with pytest.raises(ValueError, match="unknown KV cache granularity"):
        KVCacheFormat.of(4, "per-token")
    assert PRE4.bytes_per_token(2, 64) == KVCacheFormat(4).bytes_per_token(2, 64) == 128
    assert PRE4.code_range(True) == (0, 15) and PRE8.code_range(True) == (0, 255)
    # An offset costs no range: keys around 300 +- 1 keep a step of 2/15, not 301/7.
    keys = 300 + torch.linspace(-1, 1, 64)
    low, high = keys.min(), keys.max()
    back = PRE4.fake_quantize(keys, PRE4.scale_of_range(low, high), low)
    assert (back - keys).abs().max() <= (2 / 15) / 2 + 1e-4
    assert (KVCacheFormat(4).fake_quantize(keys, KVCacheFormat(4).scale_of(high)) - keys).abs().max() > 1


def test_calibration_takes_the_keys_before_rope():
    graph = tiny_graph("tiny-qwen2")
    tokens = np.random.default_rng(0).integers(0, graph.index.vocab_size, (8, 32))
    quant = kv_quantizations(graph, {0: PRE4}, tokens)[0]
    k_proj = graph.layer(0).attention.k_proj
    assert quant.k_base is not None and quant.v_base is not None
    # The unrotated keys' bias sits inside each channel's range (after RoPE it would be spread).
    bias = k_proj.bias.detach().reshape(quant.k_base.shape)
    assert ((quant.k_base <= bias + 1e-3) & (bias <= quant.k_base + quant.k_scale * 15 + 1e-3)).float().mean() > 0.9
    assert torch.allclose(quant.v_base, -8 * quant.v_scale)


def _export(name: str, folder, mixed: bool = True):
    graph = tiny_graph(name)
    layers = graph.kv_layers()
    formats = {layer: (PRE4 if i % 3 == 0 else PRE8 if i % 3 == 1 or not mixed else KVCacheFormat(4))
               for i, layer in enumerate(layers)}  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, graph.index.vocab_size, (8, 32))
    run_pass(QuantizeKVCache(tuple(formats), kv_quantizations(graph, formats, tokens)), graph)
    export_decoder(graph, str(folder))
    return graph, formats


@pytest.mark.parametrize("name", FITS)
def test_every_family_it_fits_matches_pytorch(name, tmp_path):
    graph, formats = _export(name, tmp_path)
    model = OnnxCausalLM(str(tmp_path))
    types = {i.name: (i.type, i.shape[-1]) for i in model.session.get_inputs() if i.name.startswith("past_key")}
    head_dim = graph.layer(graph.kv_layers()[0]).attention.head_dim
    assert types["past_key_values.0.key"] == ("tensor(uint8)", head_dim // 2)
    ids, mask, positions, reference, decode = prefill_and_decode_match(graph, tmp_path)
    # The stored codes are PyTorch's rounding of the unrotated keys (layer 0 is int4 pre-rope).
    first = graph.kv_layers()[0]
    attention = graph.layer(first).attention
    seen = {}
    attention.observe = lambda k, v, rotated, interleaved: seen.update(k=k)
    attention.observe.before_rope = True
    graph.forward(ids, mask, positions)
    attention.observe = None
    own = PRE4.codes(seen["k"], attention.kv_quant.k_scale, attention.kv_quant.k_base)
    stored = unpack_codes(np.asarray(decode.present[0].numpy()), PRE4).float()
    assert (own != stored).float().mean() < 1e-3
    for layer in formats:  # the quantized cache changes the model: the test can fail
        graph.layer(layer).attention.kv_quant = None
    assert np.abs(graph.forward(ids, mask, positions).numpy() - reference).max() > 1e-4


def test_left_padding_keeps_each_rows_logits(tmp_path):
    # Codes taken before RoPE do not depend on where a row starts: a left-padded row's logits are
    # its own. (GroupQueryAttention's caches round rotated keys, so padding moves their codes.)
    graph, _ = _export("tiny-llama", tmp_path, mixed=False)
    model = OnnxCausalLM(str(tmp_path))
    ids = torch.randint(0, graph.index.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: 4 tokens after 3 padding slots
    prefill = model.step(ids.numpy(), mask.numpy(), np.zeros_like(ids.numpy()))
    short = ids[1:, 3:]
    alone = graph.forward(short, torch.ones_like(short), torch.arange(4)[None]).numpy()
    assert np.abs(prefill.logits[1, 3:] - alone[0]).max() < 1e-4
    step = torch.randint(0, graph.index.vocab_size, (2, 1), generator=torch.Generator().manual_seed(3))
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    decode = model.step(step.numpy(), mask.numpy(), np.zeros((2, 1), np.int64), prefill.present)
    longer = torch.cat([short, step[1:]], 1)
    alone = graph.forward(longer, torch.ones_like(longer), torch.arange(5)[None]).numpy()
    assert np.abs(decode.logits[1, -1] - alone[0, -1]).max() < 1e-4


def test_check_refuses_a_family_it_does_not_fit(tmp_path):
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-hunyuan"\nquantize kv-cache to int4 pre-rope\n')
    checked = run_cli("check", str(recipe))
    assert checked.code != 0 and "a pre-rope KV cache does not fit" in checked.err and "after RoPE" in checked.err


def test_apply_verifies_a_pre_rope_cache_and_says_genai_cannot_run_it(tmp_path):
    result, report = applied(tmp_path, 'model "tiny-qwen2"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n'
                             "quantize kv-cache by similarity {\n  most important 2 -> int8 pre-rope\n"
                             "  rest -> int4 pre-rope\n}\n")  # fmt: skip
    assert result.code == 0, result.err
    assert report["verification"]["passed"], report["verification"]
    codes = report["verification"]["kv_cache_codes"]
    assert codes["compared"] > 0 and codes["not_at_a_tie"] == 0
    assert sorted(f["granularity"] for f in report["kv_cache"]["formats"].values()) == ["pre-rope"] * 6
    assert not report["onnxruntime_genai"]["written"] and "pre-rope" in report["onnxruntime_genai"]["reason"]
    graph = onnx.load(Path(tmp_path, "out", "model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    ran = run_cli("run", str(tmp_path / "out"), "--prompt", "The cat", "--max-new-tokens", "4")
    assert ran.code == 0, ran.err


def test_an_fp16_export_keeps_the_cache_arithmetic_in_float32(tmp_path):
    result, report = applied(tmp_path, 'model "tiny-gemma2"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n'
                             "quantize kv-cache to int4 pre-rope\nexport onnx precision fp16\n")  # fmt: skip
    assert result.code == 0, result.err
    assert report["verification"]["passed"] and report["kv_cache"]["after"]["bytes_per_token"] * 4 == (
        report["kv_cache"]["before"]["bytes_per_token"])
    graph = onnx.load(Path(tmp_path, "out", "model.onnx"), load_external_data=False).graph
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    widened = [n for n in graph.node if n.op_type == "Cast" and n.name.endswith("/scores_float")
               and n.attribute[0].i == onnx.TensorProto.FLOAT]  # fmt: skip
    assert len(softmax) == len(widened) == 6  # every layer's scores are float32 before the mask and softmax


def test_the_pass_refuses_a_pre_rope_cache_without_bases():
    from surgery.formats.kv_cache import KVQuantization

    graph = tiny_graph("tiny-llama")
    attention = graph.layer(0).attention
    shape = PRE4.scale_shape(attention.num_kv_heads, attention.head_dim)
    with pytest.raises(Exception, match="needs key bases"):
        run_pass(QuantizeKVCache((0,), {0: KVQuantization(PRE4, torch.ones(shape), torch.ones(shape))}), graph)


def test_a_long_prompt_enters_the_cache_in_pieces_with_the_same_tokens(tmp_path, monkeypatch):
    from surgery.backend import runtime

    graph, _ = _export("tiny-llama", tmp_path, mixed=True)
    model = OnnxCausalLM(str(tmp_path))
    prompt = torch.randint(0, graph.index.vocab_size, (23,), generator=torch.Generator().manual_seed(4)).tolist()
    whole = model.generate(prompt, 6, set())
    calls = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda *a: calls.append(a[0].shape[1]) or step(*a))
    monkeypatch.setattr(runtime, "PREFILL_PIECE", 5)
    assert model.generate(prompt, 6, set()) == whole
    assert calls[:5] == [5, 5, 5, 5, 3] and len(calls) == 10  # 4 pieces, the rest with the first token
