"""`quantize kv-cache`: the format rounds as onnxruntime's GroupQueryAttention does, calibration
covers every position's keys, every family's quantized cache matches PyTorch in onnxruntime,
and onnxruntime-genai generates our tokens from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh

from conftest import TINY, applied, prefill_and_decode_match, run_cli, tiny_graph
from surgery.analysis.kv_calibration import _envelope, _rotated, kv_quantizations
from surgery.backend.runtime import OnnxCausalLM
from surgery.export.decoder import export_decoder
from surgery.formats.kv_cache import KVCacheFormat, KVQuantization, cache_bytes_per_token
from surgery.passes import QuantizeKVCache, run_pass

INT8, INT4 = KVCacheFormat(8), KVCacheFormat(4)


def _gqa_codes(fmt: KVCacheFormat, key: np.ndarray, scale: float) -> np.ndarray:
    """The codes onnxruntime's GroupQueryAttention writes into its present key for `key`
    (1, seq, kv_heads * head_dim), one head of 16 dimensions, per-tensor `scale`."""
    seq, head_dim = key.shape[1], 16
    cache = fmt.onnx_type
    width = fmt.stored_head_dim(head_dim)
    inputs = [oh.make_tensor_value_info("q", TensorProto.FLOAT, [1, seq, head_dim]),
              oh.make_tensor_value_info("k", TensorProto.FLOAT, [1, seq, head_dim]),
              oh.make_tensor_value_info("v", TensorProto.FLOAT, [1, seq, head_dim]),
              oh.make_tensor_value_info("pk", cache, [1, 1, 0, width]),
              oh.make_tensor_value_info("pv", cache, [1, 1, 0, width]),
              oh.make_tensor_value_info("sk", TensorProto.INT32, [1]),
              oh.make_tensor_value_info("tl", TensorProto.INT32, [])]  # fmt: skip
    scales = [oh.make_tensor(n, TensorProto.FLOAT, [1], [scale]) for n in ("ks", "vs")]
    node = oh.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sk", "tl", "", "", "", "", "", "ks", "vs"],
                        ["o", "present_key", "present_value"], domain="com.microsoft", num_heads=1,
                        kv_num_heads=1, k_quant_type=fmt.quant_type, v_quant_type=fmt.quant_type,
                        kv_cache_bit_width=fmt.bits)  # fmt: skip
    outputs = [oh.make_tensor_value_info("o", TensorProto.FLOAT, None),
               *(oh.make_tensor_value_info(n, cache, None) for n in ("present_key", "present_value"))]
    model = oh.make_model(oh.make_graph([node], "gqa", inputs, outputs, scales),
                          opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])  # fmt: skip
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, 1, 0, width), np.int8 if fmt.bits == 8 else np.uint8)
    feed = {"q": key, "k": key, "v": key, "pk": empty, "pv": empty,
            "sk": np.array([seq - 1], np.int32), "tl": np.array(seq, np.int32)}  # fmt: skip
    return session.run(["present_key"], feed)[0]


@pytest.mark.parametrize("fmt", [KVCacheFormat(8, False), KVCacheFormat(4, False)], ids=lambda f: f.name)
def test_codes_are_onnxruntimes(fmt):
    # Halves round to even, beyond the range clamps, int4 packs low nibble first with +8.
    values = [0.5, 1.5, -0.5, -1.5, 2.5, 400.0, -400.0, 3.2, -7.7, 6.9, 0.0, -8.0, 7.4, -2.5, 9.0, -9.0]
    key = (np.array(values, np.float32) * 0.1)[None, None]
    written = _gqa_codes(fmt, key, 0.1)[0, 0, 0]
    ours = fmt.fake_quantize(torch.from_numpy(key), torch.tensor(0.1)) / 0.1
    codes = ours.round().to(torch.int64).numpy()[0, 0]
    if fmt.bits == 8:
        assert written.tolist() == codes.tolist()
    else:
        nibbles = (codes + 8).astype(np.uint8)
        assert written.tolist() == (nibbles[0::2] | (nibbles[1::2] << 4)).tolist()
    assert codes[:5].tolist() == [0, 2, 0, -2, 2]  # round half to even


def test_sizes_are_the_formats():
    assert INT8.stored_head_dim(64) == 64 and INT4.stored_head_dim(64) == 32
    assert INT8.bytes_per_token(3, 64) == 384 and INT4.bytes_per_token(3, 64) == 192
    layers = {"0": (3, 64, None), "1": (3, 64, INT8.to_json()), "2": (3, 64, INT4.to_json())}
    assert cache_bytes_per_token(layers, 2) == 768 + 384 + 192
    assert KVCacheFormat.from_json(KVCacheFormat(4, per_channel=False).to_json()) == KVCacheFormat(4, False)


def test_the_key_envelope_covers_every_position():
    # A rotated pair reaches its norm at some angle: the threshold is set there, not at the
    # angles the calibration text happened to show.
    torch.manual_seed(0)
    keys = torch.randn(50, 2, 16)
    envelope = _envelope(keys, 16).amax(0)
    a, b = keys[..., :8], keys[..., 8:]
    angles = torch.linspace(0, 2 * torch.pi, 721)[:, None, None, None]
    every = torch.cat([a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()], -1)
    assert torch.allclose(every.abs().amax((0, 1)), envelope, rtol=1e-4)
    assert (envelope >= keys.abs().amax(0)).all() and (envelope > keys.abs().amax(0) * 1.05).any()
    assert (_rotated(keys, 16).abs().amax(0) <= envelope + 1e-5).all()


def _quantized_export(name: str, formats: dict, folder: Path):
    graph = tiny_graph(name)
    tokens = np.random.default_rng(0).integers(0, graph.index.vocab_size, (8, 32))
    quantizations = kv_quantizations(graph, formats, tokens)
    run_pass(QuantizeKVCache(tuple(formats), quantizations), graph)
    export_decoder(graph, str(folder))
    return graph


@pytest.mark.parametrize("name", TINY)
def test_every_family_matches_pytorch_with_a_quantized_cache(name, tmp_path):
    layers = tiny_graph(name).kv_layers()
    formats = {layer: (INT8 if i % 2 else KVCacheFormat(4, per_channel=i % 3 == 0)) for i, layer in enumerate(layers)}
    graph = _quantized_export(name, formats, tmp_path)
    model = OnnxCausalLM(str(tmp_path))
    types = {i.name: i.type for i in model.session.get_inputs() if i.name.startswith("past_key_values.")}
    assert types["past_key_values.0.key"] == "tensor(uint8)" and types["past_key_values.1.key"] == "tensor(int8)"
    ids, mask, positions, reference, _ = prefill_and_decode_match(graph, tmp_path)
    for layer in layers:  # the quantized cache changes the model: the test can fail
        graph.layer(layer).attention.kv_quant = None
    assert np.abs(graph.forward(ids, mask, positions).numpy() - reference).max() > 1e-4


def test_int8_moves_the_logits_less_than_int4(tmp_path):
    graph = tiny_graph("tiny-llama")
    tokens = np.random.default_rng(0).integers(0, graph.index.vocab_size, (8, 32))
    ids = torch.from_numpy(tokens[:2])
    mask, positions = torch.ones_like(ids), torch.arange(32).expand(2, -1)
    exact = graph.forward(ids, mask, positions)
    moved = {}
    for fmt in (INT8, INT4):
        quantizations = kv_quantizations(graph, dict.fromkeys(graph.kv_layers(), fmt), tokens)
        for layer, quant in quantizations.items():
            graph.layer(layer).attention.kv_quant = quant
        moved[fmt.name] = float((graph.forward(ids, mask, positions) - exact).abs().max())
        for layer in quantizations:
            graph.layer(layer).attention.kv_quant = None
    assert 0 < moved["int8"] < moved["int4"] / 4


def test_the_pass_refuses_scales_of_another_shape():
    graph = tiny_graph("tiny-llama")
    wrong = KVQuantization(INT8, torch.ones(1, 7, 1, 3), torch.ones(1, 7, 1, 3))
    with pytest.raises(Exception, match="key scales of shape"):
        run_pass(QuantizeKVCache((0,), {0: wrong}), graph)


def test_apply_writes_a_quantized_cache_genai_runs(tmp_path):
    from test_genai import PROMPTS, genai_greedy, our_greedy

    recipe = tmp_path / "kv.surg"
    recipe.write_text('model "tiny-llama"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n'
                      "drop attention layers 1\nquantize kv-cache to int4\n")  # fmt: skip
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    assert "KV cache: 1,536 -> 160 bytes per token" in result.out
    folder = str(tmp_path / "out")
    report = json.loads(Path(folder, "surgery.json").read_text())
    assert report["kv_cache"]["after"]["bytes_per_token"] == 5 * 32 and report["verification"]["passed"]
    graph = onnx.load(Path(folder, "model.onnx"), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 5 and all(len(n.input) == 14 for n in attention)
    assert genai_greedy(folder, [PROMPTS[0]], 8) == [our_greedy(folder, PROMPTS[0], 8)]


def test_mixed_widths_run_in_onnxruntime_but_genai_is_not_configured(tmp_path):
    result, report = applied(tmp_path, 'model "tiny-qwen2"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n'
                             "quantize kv-cache by similarity {\n  most important 50% -> int8\n"
                             "  rest -> int4\n}\n")  # fmt: skip
    assert result.code == 0, result.err
    assert not report["onnxruntime_genai"]["written"] and "differ in width" in report["onnxruntime_genai"]["reason"]
    assert sorted(f["bits"] for f in report["kv_cache"]["formats"].values()) == [4] * 3 + [8] * 3
    ran = run_cli("run", str(tmp_path / "out"), "--prompt", "The cat", "--max-new-tokens", "4")
    assert ran.code == 0, ran.err


def test_a_cache_budget_searches_how_many_layers_keep_int8(tmp_path):
    # 6 layers of 2 key/value heads of 16: 64 bytes a token at int8, 32 at int4 (per layer).
    recipe = tmp_path / "fit.surg"
    recipe.write_text('model "tiny-llama"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n'
                      "quantize kv-cache by similarity as many as fit {\n    most important -> int8\n"
                      "    rest -> int4\n    kv-cache at most 0.06 MB at 256 tokens\n}\n")  # fmt: skip
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    assert "layers with an int8 KV cache = 1" in result.out
    report = json.loads(Path(tmp_path, "out", "surgery.json").read_text())
    # (6 * 32 + n * 32) * 256 <= 60,000 bytes: n = 1 layer keeps int8.
    assert sorted(f["bits"] for f in report["kv_cache"]["formats"].values()) == [4] * 5 + [8]
    assert report["kv_cache"]["after"]["bytes_per_token"] * 256 <= 60_000
    unmarked = tmp_path / "unmarked.surg"
    unmarked.write_text('model "tiny-llama"\nquantize kv-cache by similarity {\n    most important 2 -> int8\n'
                        "    rest -> int4\n    kv-cache at most 1 GB at 256 tokens\n}\n")  # fmt: skip
    checked = run_cli("check", str(unmarked))
    assert checked.code != 0 and "need `as many as fit`" in checked.err


def test_verification_reads_onnxruntimes_codes_and_judges_their_rounding():
    from surgery.backend.verify_cache import CacheReadBack, CodeCheck, unpack_codes

    scale = torch.tensor(0.1)
    k = torch.tensor([[[[0.25, 0.7, -0.31, 1.0]]]])  # x / scale: 2.5 (a tie), 7, -3.1, 10
    v = torch.zeros_like(k)
    check = CodeCheck()
    theirs = torch.tensor([[[[3, 7, -3, 10]]]], dtype=torch.int16)  # the tie rounded up: allowed
    keys, _ = CacheReadBack(theirs, torch.zeros_like(theirs), check).take(KVQuantization(INT8, scale, scale), k, v)
    assert torch.allclose(keys, theirs.float() * 0.1)  # attention reads onnxruntime's codes
    assert (check.compared, check.differ, check.not_at_tie) == (8, 1, 0)
    wrong = torch.tensor([[[[2, 8, -3, 10]]]], dtype=torch.int16)  # 7 read as 8: not a tie
    CacheReadBack(wrong, torch.zeros_like(wrong), check).take(KVQuantization(INT8, scale, scale), k, v)
    assert check.not_at_tie == 1
    packed = np.array([[[[0x1F, 0x80]]]], np.uint8)  # low nibble first, offset 8
    assert unpack_codes(packed, INT4).tolist() == [[[[7, -7, -8, 0]]]]
