"""Layer-major computation: importance scores, verification and quantization that hold a layer at
a time compute what the whole-model versions compute.

pattern: a seeded tiny model saved as safetensors and loaded lazily (parameters on meta);
replacement: the layer-major pass (`forward_layerwise`, the teacher-forced verification, the
quantize-while-writing export); comparison: the same numbers from the whole model loaded in
memory and the batch-by-batch forward, to 1e-5, and the bytes the ONNX quantize pass writes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_lazy import CONVERTED_ON_LOADING, eager_graph, lazy_graph, saved

from conftest import run_cli, write
from surgery.backend.verify import compare, prompt_batch, trace_reference
from surgery.backend.verify_layerwise import float_compute_twin, teacher_forced_traces, written_weights
from surgery.calibration import CalibrationSpec
from surgery.export.decoder import export_decoder
from surgery.export.options import ExportOptions
from surgery.formats.weights import WeightFormat
from surgery.importance.compute import ScoreRequest, compute_importance
from surgery.importance.measures import residual_statistics
from surgery.ir.inputs import calibration_batches, position_ids_from_mask
from surgery.models import builtin
from surgery.models.lazy import LazyWeights, resident_bytes, unique_parameters
from surgery.models.specs import resolve_spec
from surgery.passes import DropAttention, Quantize, run_pass

DENSE_TINY = tuple(name for name in builtin.TINY_MODELS if name not in CONVERTED_ON_LOADING)
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _batches(graph, count: int = 3) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, graph.index.vocab_size, (2, 11), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # a left-padded row
        batches.append((ids, mask, position_ids_from_mask(mask)))
    return batches


@pytest.mark.parametrize("name", tuple(builtin.TINY_MODELS))
def test_layer_major_forward_is_the_batch_by_batch_forward(name, tmp_path):
    folder = saved(name, tmp_path / name)
    lazy, eager = lazy_graph(folder), eager_graph(folder)
    run_pass(DropAttention(layers=(1,)), lazy)
    run_pass(DropAttention(layers=(1,)), eager)
    batches = _batches(eager)
    expected = [eager.forward(*batch) for batch in batches]
    for got, want in zip(lazy.forward_layerwise(batches), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if lazy.weights is not None:
        assert resident_bytes(unique_parameters(lazy.all_modules())) == 0  # all released


@pytest.mark.parametrize("name", DENSE_TINY)
def test_streamed_importance_scores_equal_the_in_memory_ones(name, tmp_path, monkeypatch):
    """Scores from a lazily loaded model, a layer at a time, against the whole model in memory
    scored batch by batch (the implementation before layer-major passes)."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved(name, tmp_path / name)
    (tmp_path / "calib.txt").write_text(TEXT)
    request = ScoreRequest(
        ("similarity", "lim", "zd", "iks"),
        CalibrationSpec(data=str(tmp_path / "calib.txt"), samples=4, length=32),
    )
    spec = resolve_spec(str(folder))
    tokenizer = builtin.byte_tokenizer()
    lazy, eager = lazy_graph(folder), eager_graph(folder)
    streamed = compute_importance(lazy, tokenizer, spec, request, use_cache=False)
    whole = compute_importance(eager, tokenizer, spec, request, use_cache=False)
    for metric in request.metrics:
        for part, scores in whole.metrics[metric].scores.items():
            np.testing.assert_allclose(streamed.metrics[metric].scores[part], scores, rtol=0, atol=1e-5)
    # The residual statistics against the whole model's batch-by-batch forward.
    tokens = np.random.default_rng(0).integers(0, eager.index.vocab_size, (12, 16))
    sums = {key: np.zeros(len(eager.layers)) for key in ("attention", "mlp", "block")}

    def observe(layer, x, m, h):
        for key, (a, b) in (("attention", (x, m)), ("mlp", (m, h)), ("block", (x, h))):
            sums[key][layer] += torch.nn.functional.cosine_similarity(a, b, dim=-1).double().sum().item()

    for ids, mask, positions in calibration_batches(tokens, 8):
        eager.forward(ids, mask, positions, observer=observe, logits=False)
    streamed = residual_statistics(lazy, tokens)
    for key, values in sums.items():
        np.testing.assert_allclose(streamed[key], values / tokens.size, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-phi3"])
def test_teacher_forced_logits_equal_the_greedy_decodes(name, tmp_path):
    """onnxruntime picks the tokens; PyTorch, fed them layer by layer without a cache, computes
    the logits its own KV-cache greedy decode computes (the same tokens, as fp32 agrees)."""
    folder = saved(name, tmp_path / name)
    lazy, eager = lazy_graph(folder), eager_graph(folder)
    out = tmp_path / "out"
    out.mkdir()
    export_decoder(eager, str(out), ExportOptions())
    tokenizer = builtin.byte_tokenizer()
    classic = trace_reference(eager, tokenizer, kv_cache=True, steps=6)
    run = [(str(out / "model.onnx"), None)]
    ((forced, recorded),) = teacher_forced_traces(lazy, tokenizer, run, 6, kv_cache=True)
    ((in_memory, _),) = teacher_forced_traces(eager, tokenizer, run, 6, kv_cache=True)
    np.testing.assert_allclose(forced.prefill_logits, in_memory.prefill_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(forced.step_logits, in_memory.step_logits, rtol=0, atol=1e-5)
    # Against the KV-cache decode: the same tokens, and logits to float rounding (a cached and an
    # uncached attention sum in different orders: measured up to 1.4e-5 on logits near 3).
    np.testing.assert_array_equal(forced.tokens, classic.tokens)
    real = classic.attention_mask.astype(bool)
    np.testing.assert_allclose(forced.prefill_logits[real], classic.prefill_logits[real], rtol=0, atol=1e-4)
    np.testing.assert_allclose(forced.step_logits, classic.step_logits, rtol=0, atol=1e-4)
    # onnxruntime's recorded run is what a replay of the trace computes.
    replayed, kept = compare(forced, str(out), 1e-3), compare(forced, str(out), 1e-3, recorded=recorded)
    assert replayed.passed and kept.passed and replayed.max_abs_logit_diff == kept.max_abs_logit_diff


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_layer_major_perplexity_and_comparison_equal_the_window_by_window_ones(name, tmp_path):
    """`verify perplexity`'s reference and `surgery eval --against <model>` run layer-major."""
    from surgery.backend.evaluate import compare as eval_compare
    from surgery.backend.evaluate import (
        compare_with_graph,
        eval_tokens,
        graph_perplexity,
        onnx_logits,
        perplexity,
        torch_logits,
    )
    from surgery.data import resolve_text

    folder = saved(name, tmp_path / name)
    lazy, eager = lazy_graph(folder), eager_graph(folder)
    (tmp_path / "text.txt").write_text(TEXT)
    tokens = eval_tokens(builtin.byte_tokenizer(), resolve_text(str(tmp_path / "text.txt")), 300, 64)
    assert len(tokens.windows()) == 5
    streamed, whole = graph_perplexity(lazy, tokens), perplexity(torch_logits(eager), tokens)
    assert streamed.tokens_scored == whole.tokens_scored and streamed.windows == whole.windows
    assert streamed.mean_nll == pytest.approx(whole.mean_nll, rel=0, abs=1e-5)
    out = tmp_path / "out"
    out.mkdir()
    run_pass(DropAttention(layers=(1,)), eager)
    export_decoder(eager, str(out), ExportOptions())
    candidate = onnx_logits(str(out))
    streamed = compare_with_graph(candidate, lazy, tokens)
    whole = eval_compare(candidate, torch_logits(eager_graph(folder)), tokens)
    assert streamed.reference.mean_nll == pytest.approx(whole.reference.mean_nll, rel=0, abs=1e-5)
    assert streamed.candidate.mean_nll == pytest.approx(whole.candidate.mean_nll, rel=0, abs=1e-5)
    assert streamed.mean_kl == pytest.approx(whole.mean_kl, rel=0, abs=1e-5) and streamed.mean_kl > 0
    assert streamed.top1_agreement == whole.top1_agreement
    assert resident_bytes(unique_parameters(lazy.all_modules())) == 0


def test_quantizing_while_writing_writes_what_the_quantize_pass_writes(tmp_path):
    """Every width, block and symmetry: the same nodes, inputs, attributes and packed arrays."""
    folder = saved("tiny-llama", tmp_path / "llama")
    graph = eager_graph(folder)
    (tmp_path / "float").mkdir()
    (tmp_path / "written").mkdir()
    export = export_decoder(graph, str(tmp_path / "float"), ExportOptions(untie_head=True))
    settings = [(4, 32, False), (8, 16, False), (4, 16, True), (8, 32, True)]
    linears = sorted(export.linears.items())
    assignment = [(node, WeightFormat(*settings[i % len(settings)])) for i, (_, node) in enumerate(linears)]
    model = onnx.load(str(tmp_path / "float" / "model.onnx"))
    run_pass(Quantize(assignment=tuple(assignment)), model)
    written = tuple((linear, WeightFormat(*settings[i % len(settings)])) for i, (linear, _) in enumerate(linears))
    result = export_decoder(graph, str(tmp_path / "written"), ExportOptions(untie_head=True, quantize_linears=written))
    streamed = onnx.load(str(tmp_path / "written" / "model.onnx"))
    assert result.parameter_count == export.parameter_count
    arrays = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (model, streamed)]
    nodes = [{n.name: n for n in m.graph.node} for m in (model, streamed)]
    assert set(nodes[0]) == set(nodes[1])
    quantized = [n for n in nodes[0].values() if n.op_type == "MatMulNBits"]
    assert len(quantized) == len(assignment)
    for node in quantized:
        other = nodes[1][node.name]
        assert list(node.input) == list(other.input) and list(node.output) == list(other.output)
        assert {a.name: a.i for a in node.attribute} == {a.name: a.i for a in other.attribute}
        for name in node.input[1:]:
            np.testing.assert_array_equal(arrays[0][name], arrays[1][name])


def test_the_exact_check_of_a_quantized_export_needs_the_quantized_weights(tmp_path):
    """The float-compute twin matches PyTorch with the quantized weights to the fp32 tolerance,
    and misses PyTorch with the original weights by far more: the check can fail."""
    folder = saved("tiny-llama", tmp_path / "llama")
    graph = lazy_graph(folder)
    out = tmp_path / "out"
    out.mkdir()
    assignment = tuple(
        (f"model.layers.{i}.{part}", WeightFormat(4, 32, False)) for i in range(graph.index.num_layers)
        for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    ) + (("lm_head", WeightFormat(8, 32, True)),)  # fmt: skip
    export_decoder(graph, str(out), ExportOptions(untie_head=True, quantize_linears=assignment))
    twin = float_compute_twin(str(out))
    tokenizer = builtin.byte_tokenizer()
    (plain, _), (exact, _) = teacher_forced_traces(
        graph, tokenizer, [(twin, None), (twin, written_weights(graph, twin))], 6, kv_cache=True
    )
    assert compare(exact, twin, 1e-3).passed
    missed = compare(plain, twin, 1e-3)
    assert not missed.passed and missed.max_abs_logit_diff > 1e-2
    os.remove(twin)


def test_a_lazy_apply_with_importance_quantization_and_verification_streams(tmp_path, monkeypatch):
    """Scores, export, int4 and verification: never more than two layers (or the embedding or
    head) loaded at once, the output verified exactly, and nothing left behind."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved("tiny-llama", tmp_path / "llama")
    (tmp_path / "calib.txt").write_text(TEXT)
    eager = eager_graph(folder)
    layer = max(sum(p.numel() * 4 for p in unique_parameters(x.modules())) for x in eager.layers)
    ends = max(p.numel() * 4 for p in (eager.embedding.weight, eager.head.weight))
    peak = {"bytes": 0}
    materialize, loaded = LazyWeights.materialize, {}

    def watched(self, params):
        done = materialize(self, params)
        for p in done:
            loaded[id(p)] = p
        peak["bytes"] = max(peak["bytes"], resident_bytes(loaded.values()))
        return done

    monkeypatch.setattr(LazyWeights, "materialize", watched)
    recipe = write(
        tmp_path / "r.surg",
        f'model "{folder}"\ncalibrate on "calib.txt" samples 4 length 32\n'
        "drop attention least important 1 by similarity\nquantize layers to int4\nquantize head to int8\n",
    )
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    assert "quantized weights, float compute; teacher-forced, layer by layer" in result.out
    assert 0 < peak["bytes"] <= max(2 * layer + ends, 2 * ends)
    assert peak["bytes"] < sum(p.numel() * 4 for p in unique_parameters(eager.all_modules()))
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        {".surgery-output", "surgery.json", "model.onnx", "model.onnx.data", "recipe.surg", "genai_config.json"}
        | {f for f in os.listdir(tmp_path / "out") if f.startswith(("tokenizer", "special_tokens", "chat_template"))}
    )


def test_prompt_batch_cuts_or_pads():
    tokenizer = builtin.byte_tokenizer()
    ids, mask = prompt_batch(tokenizer, ("ab", "abcd"))
    assert ids.shape == (2, 4) and mask[0].tolist() == [0, 0, 1, 1]
    ids, mask = prompt_batch(tokenizer, ("ab", "abcd"), padded=False)
    assert ids.shape == (2, 2) and mask.all()


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M lazily loaded (weights in the converted checkpoint) and loaded whole."""
    from surgery.architectures.conformance import checked_graph
    from surgery.models.index import ModelIndex
    from surgery.models.loading import load_model

    spec = resolve_spec("smollm2-135m")
    graphs = []
    for lazy in (True, False):
        model, tokenizer, weights = load_model(spec, lambda *_: None, lazy=lazy)
        graphs.append(checked_graph(model, ModelIndex.from_config("smollm2-135m", model.config), weights))
    assert graphs[0].weights is not None and graphs[1].weights is None
    return (*graphs, tokenizer)


@pytest.mark.slow
def test_smollm2_streamed_scores_and_verification_logits_equal_the_in_memory_ones(smollm2, tmp_path):
    lazy, eager, tokenizer = smollm2
    tokens = np.random.default_rng(0).integers(0, eager.index.vocab_size, (4, 64))
    sums = {key: np.zeros(len(eager.layers)) for key in ("attention", "mlp", "block")}

    def observe(layer, x, m, h):
        for key, (a, b) in (("attention", (x, m)), ("mlp", (m, h)), ("block", (x, h))):
            sums[key][layer] += torch.nn.functional.cosine_similarity(a, b, dim=-1).double().sum().item()

    for ids, mask, positions in calibration_batches(tokens, 2):  # batch by batch, the whole model
        eager.forward(ids, mask, positions, observer=observe, logits=False)
    streamed = residual_statistics(lazy, tokens, batch_size=2)
    for key, values in sums.items():
        np.testing.assert_allclose(streamed[key], values / tokens.size, rtol=0, atol=1e-5)
    out = tmp_path / "out"
    out.mkdir()
    export_decoder(lazy, str(out), ExportOptions())
    run = [(str(out / "model.onnx"), None)]
    ((forced, _),) = teacher_forced_traces(lazy, tokenizer, run, 8, kv_cache=True)
    ((in_memory, _),) = teacher_forced_traces(eager, tokenizer, run, 8, kv_cache=True)
    np.testing.assert_allclose(forced.prefill_logits, in_memory.prefill_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(forced.step_logits, in_memory.step_logits, rtol=0, atol=1e-5)
    verification = compare(forced, str(out), 1e-3)
    assert verification.passed and verification.greedy_tokens_mismatched == 0


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


@CUDA
@pytest.mark.parametrize("name", tuple(builtin.TINY_MODELS))
def test_sequential_onloading_on_cuda_computes_the_cpu_forward(name, tmp_path):
    """Each layer moved to the GPU in turn (hidden states staying there) gives the CPU's logits,
    and leaves every parameter back in the checkpoint and every buffer on the CPU."""
    folder = saved(name, tmp_path / name)
    lazy, eager = lazy_graph(folder), eager_graph(folder)
    batches = _batches(eager)
    expected = [eager.forward(*batch) for batch in batches]
    for got, want in zip(lazy.forward_layerwise(batches, device="cuda"), expected, strict=True):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-4)
    for graph in (lazy, eager):
        for module in graph.all_modules():
            assert all(t.device.type in ("cpu", "meta") for t in [*module.parameters(), *module.buffers()])


@CUDA
@pytest.mark.parametrize("name", DENSE_TINY)
def test_importance_scored_on_cuda_equals_the_cpu_scores(name, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    folder = saved(name, tmp_path / name)
    request = ScoreRequest(
        ("similarity", "lim", "iks"), CalibrationSpec(data=str(tmp_path / "calib.txt"), samples=4, length=32)
    )
    spec, tokenizer = resolve_spec(str(folder)), builtin.byte_tokenizer()
    on_gpu = compute_importance(lazy_graph(folder), tokenizer, spec, request, use_cache=False, device="cuda")
    on_cpu = compute_importance(lazy_graph(folder), tokenizer, spec, request, use_cache=False)
    for metric in request.metrics:
        for part, values in on_cpu.metrics[metric].scores.items():
            np.testing.assert_allclose(on_gpu.metrics[metric].scores[part], values, rtol=0, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_message(tmp_path):
    result = run_cli(
        "importance", "--model", "tiny-llama", "--metric", "similarity", "--device", "cuda",
        "-o", str(tmp_path / "scores.json"),
    )  # fmt: skip
    assert result.code == 1
    assert "--device cuda: this PyTorch sees no CUDA device" in result.err
    assert "Traceback" not in result.err
    assert not (tmp_path / "scores.json").exists()


@CUDA
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_layer_major_perplexity_on_cuda_equals_the_cpu_one(name, tmp_path):
    """`verify perplexity`'s reference and `eval --against --device cuda` with one layer on the
    GPU at a time: the CPU's perplexity, every parameter back in the checkpoint after."""
    from surgery.backend.evaluate import eval_tokens, graph_perplexity
    from surgery.data import resolve_text

    folder = saved(name, tmp_path / name)
    (tmp_path / "text.txt").write_text(TEXT)
    tokens = eval_tokens(builtin.byte_tokenizer(), resolve_text(str(tmp_path / "text.txt")), 300, 64)
    lazy = lazy_graph(folder)
    on_gpu, on_cpu = graph_perplexity(lazy, tokens, device="cuda"), graph_perplexity(lazy_graph(folder), tokens)
    assert on_gpu.tokens_scored == on_cpu.tokens_scored
    assert on_gpu.mean_nll == pytest.approx(on_cpu.mean_nll, rel=0, abs=1e-5)
    assert resident_bytes(unique_parameters(lazy.all_modules())) == 0


@CUDA
def test_eval_against_a_model_on_cuda_equals_the_cpu_comparison(tmp_path):
    """`surgery eval OUT --against MODEL --device cuda` reports what the CPU run reports."""
    out = tmp_path / "out"
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\ndrop block layers 2\n')
    assert run_cli("apply", str(recipe), "-o", str(out), "--no-verify").code == 0
    common = ("eval", str(out), "--max-tokens", "400", "--window", "200", "--against", "tiny-llama", "--json")
    on_gpu, on_cpu = run_cli(*common, "--device", "cuda"), run_cli(*common)
    assert on_gpu.code == on_cpu.code == 0, on_gpu.err
    gpu, cpu = json.loads(on_gpu.out), json.loads(on_cpu.out)
    assert gpu["reference"]["mean_nll"] == pytest.approx(cpu["reference"]["mean_nll"], rel=0, abs=1e-5)
    assert gpu["mean_kl"] == pytest.approx(cpu["mean_kl"], rel=0, abs=1e-5)
    assert gpu["top1_agreement"] == cpu["top1_agreement"]


def _reports_on_each_device(recipe, section: str) -> list[dict]:
    """`section` of the report of `surgery apply RECIPE --device D`, for D = cuda, then cpu."""
    reports = []
    for device in ("cuda", "cpu"):
        out = recipe.parent / f"out-{device}"
        result = run_cli("apply", str(recipe), "-o", str(out), "--device", device)
        assert result.code == 0, result.err
        reports.append(json.loads((out / "surgery.json").read_text())[section])
    return reports


@CUDA
def test_verify_perplexity_with_device_cuda_reports_the_cpu_reference(tmp_path):
    """`surgery apply --device cuda`: `verify perplexity`'s original-model perplexity, computed
    with one layer on the GPU at a time, is the CPU's."""
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\ndrop block layers 2\nverify perplexity on "wikitext-2-test" '
                      "max-increase 1000% tokens 256\n")  # fmt: skip
    gpu, cpu = (report["original_pytorch"]["mean_nll"] for report in _reports_on_each_device(recipe, "perplexity"))
    assert gpu == pytest.approx(cpu, rel=0, abs=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_eval_device_cuda_without_cuda_is_a_message(tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\nexport onnx\n')
    assert run_cli("apply", str(recipe), "-o", str(out), "--no-verify").code == 0
    result = run_cli(
        "eval", str(out), "--max-tokens", "64", "--window", "32", "--against", "tiny-llama", "--device", "cuda"
    )
    assert result.code == 1
    assert "--device cuda: this PyTorch sees no CUDA device" in result.err and "Traceback" not in result.err


def test_eval_device_without_a_pytorch_reference_is_a_message(tmp_path):
    """--device places the --against model's PyTorch layers; without one it would do nothing."""
    out = tmp_path / "out"
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\nexport onnx\n')
    assert run_cli("apply", str(recipe), "-o", str(out), "--no-verify").code == 0
    for extra in ((), ("--against", str(out))):
        result = run_cli("eval", str(out), "--max-tokens", "64", "--window", "32", "--device", "cuda", *extra)
        assert result.code == 1
        assert "runs the --against model in PyTorch, and there is none here" in result.err
        assert "= hint: give --against a model spec" in result.err and "Traceback" not in result.err


def test_layer_major_perplexity_keeps_no_window_log_probs(tmp_path, monkeypatch):
    """What the per-window callback returns is kept by forward_layerwise until the end: the
    perplexity's callback returns nothing, so no window's (T, vocab) log-probs pile up."""
    from surgery.backend.evaluate import eval_tokens, graph_perplexity
    from surgery.data import resolve_text

    graph = lazy_graph(saved("tiny-llama", tmp_path / "m"))
    (tmp_path / "text.txt").write_text(TEXT)
    tokens = eval_tokens(builtin.byte_tokenizer(), resolve_text(str(tmp_path / "text.txt")), 300, 64)
    kept = []
    real = graph.forward_layerwise
    monkeypatch.setattr(graph, "forward_layerwise", lambda *a, **k: kept.extend(real(*a, **k)) or kept)
    graph_perplexity(graph, tokens)
    assert len(kept) == len(tokens.windows()) and all(item is None for item in kept)


@CUDA
@pytest.mark.parametrize(
    "body", ["drop attention layers 1\n", "quantize layers to int4 symmetric\nquantize head to int4 symmetric\n"]
)
def test_verification_with_device_cuda_reports_the_cpu_verification(body, tmp_path):
    """`surgery apply --device cuda`: the teacher-forced, layer-major verification runs PyTorch's
    side with one layer on the GPU at a time, the quantized run with the written weights
    filled in there; it reports what the CPU's reports."""
    folder = saved("tiny-llama", tmp_path / "m")
    recipe = tmp_path / "r.surg"
    recipe.write_text(f'model "{folder}"\n{body}')
    gpu, cpu = _reports_on_each_device(recipe, "verification")
    assert gpu["passed"] and cpu["passed"] and gpu["reference"] == cpu["reference"] == "teacher-forced, layer by layer"
    assert gpu["max_abs_logit_diff"] == pytest.approx(cpu["max_abs_logit_diff"], abs=1e-4)
    assert gpu["greedy_tokens_mismatched"] == cpu["greedy_tokens_mismatched"]
