"""Weights as references: a model folder loaded lazily, its export written node by node.

Every tiny family is saved as a safetensors folder and loaded with its parameters left in the
files; the description check runs on a small real copy (a few layers, the probe's vocabulary
rows); the streamed export writes the same bytes as an export of the model loaded whole, while
never holding more than two layers' weights (the next is read while one is written), or the embedding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY_MOE, run_cli, write
from surgery import architectures
from surgery.architectures.conformance import DescriptionMismatch, checked_graph, lazy_probe, probe_layers
from surgery.architectures.description import Scale
from surgery.export.decoder import export_decoder
from surgery.export.options import ExportOptions
from surgery.models import builtin
from surgery.models.index import ModelIndex
from surgery.models.lazy import LazyWeights, resident_bytes, unique_parameters
from surgery.models.loading import load_model
from surgery.models.specs import resolve_spec
from surgery.passes import DropAttention, run_pass

ALL_TINY = tuple(builtin.TINY_MODELS)
# transformers 5 fuses per-expert checkpoint tensors into one on loading (and Mixtral renames
# block_sparse_moe to mlp): these are built a layer at a time from transformers' own table.
CONVERTED_ON_LOADING = ("tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v2-moe",
                        "tiny-phimoe", "tiny-lfm2-moe")  # fmt: skip
# Of those, the ones whose experts take prune and merge (check refuses DeepSeek's and Phi-MoE's).
REWRITABLE = tuple(name for name in CONVERTED_ON_LOADING if name in TINY_MOE)


def saved(name: str, folder: Path) -> Path:
    """The seeded tiny model `name` as a Hugging Face folder (safetensors and tokenizer)."""
    builtin.tiny_model(name).save_pretrained(folder)
    builtin.byte_tokenizer().save_pretrained(folder)
    return folder


def lazy_graph(folder: Path):
    model, _, weights = load_model(resolve_spec(str(folder)), lambda *_: None, lazy=True)
    return checked_graph(model, ModelIndex.from_config(folder.name, model.config), weights)


def eager_graph(folder: Path):
    model, _, _ = load_model(resolve_spec(str(folder)), lambda *_: None)
    return checked_graph(model, ModelIndex.from_config(folder.name, model.config))


@pytest.mark.parametrize("name", ALL_TINY)
def test_the_streamed_export_writes_what_the_whole_model_writes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved(name, tmp_path / name)
    lazy = lazy_graph(folder)
    assert lazy.weights is not None
    assert bool(lazy.weights.sources) == (name in CONVERTED_ON_LOADING)
    assert all(p.device.type == "meta" for p in unique_parameters(lazy.all_modules()))
    eager = eager_graph(folder)
    for graph in (lazy, eager):
        run_pass(DropAttention(layers=(1,)), graph)
    peak = {"bytes": 0}
    materialize = LazyWeights.materialize

    def watched(self, params):
        loaded = materialize(self, params)
        peak["bytes"] = max(peak["bytes"], resident_bytes(unique_parameters(lazy.all_modules())))
        return loaded

    monkeypatch.setattr(LazyWeights, "materialize", watched)
    (tmp_path / "lazy").mkdir()
    (tmp_path / "eager").mkdir()
    export_decoder(lazy, str(tmp_path / "lazy"), ExportOptions())
    export_decoder(eager, str(tmp_path / "eager"), ExportOptions())
    for file in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "lazy" / file).read_bytes() == (tmp_path / "eager" / file).read_bytes(), file
    # Nothing stays loaded, and at most the largest of (embedding, two consecutive layers + final
    # norm, head) was: the next layer is read while one is written.
    assert resident_bytes(unique_parameters(lazy.all_modules())) == 0
    sizes = [resident_bytes(unique_parameters(eager.all_modules()[i : i + 1])) for i in range(len(eager.all_modules()))]
    layer_sizes = [sum(resident_bytes(unique_parameters([m])) for m in layer.modules()) for layer in eager.layers]
    final_norm = resident_bytes(unique_parameters([eager.head.final_norm]))
    pairs = [a + b for a, b in zip(layer_sizes, layer_sizes[1:], strict=False)] or layer_sizes
    assert peak["bytes"] <= max(sizes[0], max(pairs) + final_norm, sizes[-1] + final_norm)
    assert peak["bytes"] < resident_bytes(unique_parameters(eager.all_modules()))


def test_fused_projections_load_as_views_of_their_checkpoint_tensor(tmp_path):
    """Phi-3 stores QKV and gate/up fused; the lazy graph's Q, K, V are views of the loaded tensor."""
    folder = saved("tiny-phi3", tmp_path / "phi3")
    lazy, eager = lazy_graph(folder), eager_graph(folder)
    attention, reference = lazy.layers[0].attention, eager.layers[0].attention
    assert len(lazy.weights.views) >= 3
    with lazy.materialized(attention):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(attention, part).weight, getattr(reference, part).weight), part
    assert attention.q_proj.weight.device.type == "meta"


def test_a_lazy_apply_never_loads_the_whole_model(tmp_path, monkeypatch):
    """`surgery apply` of drops and an export streams, with verification or without, and with a
    perplexity check."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved("tiny-llama", tmp_path / "llama")
    calls = []
    real = LazyWeights.materialize

    def counted(self, params):
        params = list(params)
        calls.append(len(params))
        return real(self, params)

    monkeypatch.setattr(LazyWeights, "materialize", counted)
    recipe = write(tmp_path / "r.surg", f'model "{folder}"\ndrop attention layers 1\nexport onnx\n')
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"), "--no-verify")
    assert result.code == 0, result.err
    total = len(unique_parameters(eager_graph(folder).all_modules()))
    assert calls and max(calls) < total / 2  # node by node
    calls.clear()
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out2"))
    assert result.code == 0, result.err
    assert "max |logit diff|" in result.out and "teacher-forced, layer by layer" in result.out
    assert max(calls) < total / 2
    calls.clear()
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 100)
    with_perplexity = write(tmp_path / "p.surg", f'model "{folder}"\ndrop attention layers 1\n'
                                       'verify perplexity on "t.txt" max-increase 900% tokens 256\n')  # fmt: skip
    result = run_cli("apply", str(with_perplexity), "-o", str(tmp_path / "out3"))
    assert result.code == 0, result.err
    assert max(calls) < total / 2
    assert (tmp_path / "out" / "model.onnx.data").read_bytes() == (tmp_path / "out2" / "model.onnx.data").read_bytes()


def test_the_description_check_of_a_lazy_model_runs_on_a_small_real_copy(tmp_path, monkeypatch):
    """A few layers, the probe's vocabulary rows; a wrong description is still caught."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved("tiny-granite", tmp_path / "granite")
    graph = lazy_graph(folder)
    small, small_graph, ids = lazy_probe(graph)
    assert small.config.num_hidden_layers == probe_layers(graph.model.config) < graph.model.config.num_hidden_layers
    assert small.config.vocab_size == len(set(ids.flatten().tolist())) < graph.index.vocab_size
    wrong = dataclasses.replace(architectures.REGISTRY["granite"], logits_divisor=Scale())
    monkeypatch.setitem(architectures.REGISTRY, "granite", wrong)
    model, _, weights = load_model(resolve_spec(str(folder)), lambda *_: None, lazy=True)
    with pytest.raises(DescriptionMismatch, match="logits differs"):
        checked_graph(model, ModelIndex.from_config("granite", model.config), weights)


def test_gemma3_probe_keeps_a_full_attention_layer():
    config = builtin.tiny_config("tiny-gemma3")
    kinds = list(config.layer_types)
    assert "full_attention" in kinds[: probe_layers(config)]


def test_a_nan_in_a_lazily_loaded_tensor_is_a_message_at_the_model_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved("tiny-llama", tmp_path / "llama")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    recipe = write(tmp_path / "r.surg", f'model "{folder}"\nexport onnx\n')
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"), "--no-verify")
    assert result.code == 1
    assert "model.layers.2.mlp.down_proj.weight" in result.err and "NaN" in result.err
    assert "r.surg:1:" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


def test_a_transposed_weight_is_written_in_blocks_of_rows(tmp_path, monkeypatch):
    """The writer copies a non-contiguous weight a few rows at a time; the bytes are the array's."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from surgery.export import writer

    monkeypatch.setattr(writer, "_BLOCK_BYTES", 4096)  # rows of 1500 bytes: 20 blocks of 2 rows
    weight = np.arange(375 * 40, dtype=np.float32).reshape(375, 40)
    graph = writer.GraphWriter(str(tmp_path / "model.onnx.data"))
    graph.weight("w", weight.T)
    graph.node("Identity", ["w"], "out", ["y"])
    graph.add_output("y", onnx.TensorProto.FLOAT, [40, 375])
    graph.save(str(tmp_path / "model.onnx"), 21, {}, "g")
    loaded = onnx.load(str(tmp_path / "model.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight.T)


@pytest.mark.parametrize("name", REWRITABLE)
def test_expert_statistics_of_a_lazy_moe_equal_the_whole_models(name, tmp_path):
    """Expert use and mean outputs, counted layer-major on a model whose fused experts are built
    from the per-expert checkpoint tensors a layer at a time, equal those of the model loaded whole."""
    from surgery.analysis.experts import expert_count, expert_statistics
    from surgery.calibration import CalibrationSpec, calibration_tokens

    folder = saved(name, tmp_path / name)
    lazy, eager = lazy_graph(folder), eager_graph(folder)
    layers = tuple(layer.index for layer in eager.layers if expert_count(layer.mlp))
    assert layers
    tokens = calibration_tokens(builtin.byte_tokenizer(), CalibrationSpec(samples=3, length=24))
    (lazy_use, lazy_out), (eager_use, eager_out) = (
        expert_statistics(graph, layers, tokens, outputs=True) for graph in (lazy, eager)
    )
    for layer in layers:
        assert lazy_use[layer] == pytest.approx(eager_use[layer], abs=1e-12)
        assert lazy_out[layer] == pytest.approx(eager_out[layer], abs=1e-5)
    assert resident_bytes(unique_parameters(lazy.all_modules())) == 0


MOE_REWRITES = {
    "prune": "prune experts layers 0..1 to 2\n",
    "merge": "merge experts layers * to 2\n",
    "merge rank": "merge experts layers * to 2 rank 50%\n",
    "prune then merge": "prune experts layers * to 3\nmerge experts layers 1 to 2 grouping router\n",
}


@pytest.mark.parametrize("name", REWRITABLE)
@pytest.mark.parametrize("rewrite", tuple(MOE_REWRITES))
def test_expert_rewrites_of_a_lazy_moe_write_what_the_whole_model_writes(name, rewrite, tmp_path, monkeypatch):
    """Prune and merge on a checkpoint folder run a layer at a time (each rewritten layer written
    aside and released), then stream to the exporter and verify layer-major: the output's weights
    and plan equal those of the same recipe with the whole model loaded; nothing is left aside."""
    import json

    from surgery.front.plan import Plan

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved(name, tmp_path / name)
    recipe = write(tmp_path / "r.surg", f'model "{folder}"\ncalibrate on "valid" samples 3 length 32\n'
                                        + MOE_REWRITES[rewrite])  # fmt: skip
    streamed = run_cli("apply", str(recipe), "-o", str(tmp_path / "streamed"), "-v")
    assert streamed.code == 0, streamed.err
    assert "one at a time" in streamed.err
    monkeypatch.setattr(Plan, "streams", lambda self, phases=None: False)  # the executor holds the whole model
    whole = run_cli("apply", str(recipe), "-o", str(tmp_path / "whole"))
    assert whole.code == 0, whole.err
    reports = [json.loads((tmp_path / out / "surgery.json").read_text()) for out in ("streamed", "whole")]
    assert reports[0]["verification"]["passed"] and reports[1]["verification"]["passed"]
    steps = [[s["parameters"] for s in report["plan"]["steps"]] for report in reports]
    assert steps[0] == steps[1]
    data = [(tmp_path / out / "model.onnx.data").read_bytes() for out in ("streamed", "whole")]
    assert data[0] == data[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_tokenizer_with_ids_beyond_the_embedding_is_a_message(tmp_path, monkeypatch):
    """A folder whose tokenizer is not its model's (ids past the embedding's rows) is reported
    when the first tokens reach the embedding, as a message with a hint, not an IndexError."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    model = builtin.tiny_model("tiny-llama")
    model.resize_token_embeddings(100)  # the byte tokenizer's ids go up to 258
    for config in (model.config, model.generation_config):  # special ids inside the 100 rows
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, None
    folder = tmp_path / "small-vocab"
    model.save_pretrained(folder)
    builtin.byte_tokenizer().save_pretrained(folder)
    recipe = write(tmp_path / "r.surg", f'model "{folder}"\ncalibrate on "valid" samples 2 length 16\n'
                                        "drop attention least important 1 by similarity\n")  # fmt: skip
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"))
    assert result.code == 1, result.err
    assert "but the model's embedding has only 100 rows" in result.err
    assert "= hint: the tokenizer does not belong to this model" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("name", REWRITABLE)
def test_expert_statistics_on_cuda_equal_the_cpu_ones(name, tmp_path):
    """`--device cuda` for prune and merge: expert use and mean outputs counted with one layer
    on the GPU at a time equal the CPU's; nothing stays loaded or on the GPU."""
    from surgery.analysis.experts import expert_count, expert_statistics
    from surgery.calibration import CalibrationSpec, calibration_tokens

    folder = saved(name, tmp_path / name)
    graph = lazy_graph(folder)
    layers = tuple(layer.index for layer in graph.layers if expert_count(layer.mlp))
    tokens = calibration_tokens(builtin.byte_tokenizer(), CalibrationSpec(samples=3, length=24))
    (gpu_use, gpu_out), (cpu_use, cpu_out) = (
        expert_statistics(graph, layers, tokens, outputs=True, device=device) for device in ("cuda", None)
    )
    for layer in layers:
        assert gpu_use[layer] == pytest.approx(cpu_use[layer], abs=1e-12)
        assert gpu_out[layer] == pytest.approx(cpu_out[layer], abs=1e-4)
    assert resident_bytes(unique_parameters(graph.all_modules())) == 0
