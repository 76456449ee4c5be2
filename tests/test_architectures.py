"""Architecture descriptions: the registry, the check against Hugging Face, and ONNX parity with
the Hugging Face model itself (not our reference) for every family, edited and not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli, tiny_graph, write
from surgery import architectures
from surgery.architectures.conformance import DescriptionMismatch, checked_graph, first_difference
from surgery.architectures.description import Norms, Scale
from surgery.architectures.hf_reference import HuggingFaceForward, edit_like_graph
from surgery.backend.verify import compare, trace_reference
from surgery.export.decoder import export_decoder
from surgery.export.options import ExportOptions
from surgery.ir.graph import DecoderGraph
from surgery.models import builtin
from surgery.models.index import ModelIndex
from surgery.passes import DropAttention, DropBlock, DropMlp, run_pass

ALL_TINY = tuple(builtin.TINY_MODELS)
NEW_FAMILIES = ("tiny-gemma3", "tiny-phi3", "tiny-granite", "tiny-olmo2", "tiny-gemma", "tiny-glm", "tiny-glm4",
                "tiny-ernie4_5", "tiny-nemotron", "tiny-hunyuan", "tiny-gpt-oss", "tiny-deepseek-v2")  # fmt: skip


# The registry.


def test_every_builtin_family_is_registered_and_declared_briefly():
    declared = {path.stem for path in (REPO / "surgery" / "architectures").glob("*.py")} - {
        "__init__", "description", "build", "conformance", "hf_reference"
    }  # fmt: skip
    assert len(declared) == len(architectures.REGISTRY) == 26
    for name in declared:
        lines = (REPO / "surgery" / "architectures" / f"{name}.py").read_text().splitlines()
        assert len(lines) <= 20, f"{name}.py has {len(lines)} lines; a family is a short declaration"
    # Every family has a tiny model in CI, and every tiny model a family.
    assert {tiny.architecture for tiny in builtin.TINY_MODELS.values()} == set(architectures.REGISTRY)


@pytest.mark.parametrize(
    ("asked", "nearest"), [("gemma3", "gemma3_text"), ("lama", "llama"), ("qwen2moe", "qwen2_moe"), ("bert", None)]
)
def test_unknown_model_types_get_the_nearest_family(asked, nearest):
    assert architectures.closest(asked) == nearest
    message = architectures.unknown_architecture(asked)
    assert (f"did you mean '{nearest}'" in message) == (nearest is not None)


# The reference built from a description against the Hugging Face forward.


@pytest.mark.parametrize("name", ALL_TINY)
def test_each_description_reproduces_its_hugging_face_model(name):
    model = builtin.tiny_model(name)
    graph = DecoderGraph(model, ModelIndex.from_config(name, model.config))
    assert first_difference(model, graph, tokens=40) is None


@pytest.mark.parametrize(
    ("name", "wrong", "where"),
    [
        # Gemma's gains are 1 + w: without the offset the first norm, before attention, is off.
        ("tiny-gemma3", {"norms": Norms(placement="sandwich", offset=0.0)}, (0, "attention output")),
        # Granite's residual multiplier scales the attention's update: the MLP then sees another input.
        ("tiny-granite", {"residual_scale": Scale()}, (0, "MLP output")),
        ("tiny-granite", {"embedding_scale": Scale()}, (None, "embedding")),
        # Phi-3 without its fused projections is caught before any forward (see below).
    ],
)
def test_a_wrong_description_is_caught_at_the_first_differing_sub_block(name, wrong, where):
    model = builtin.tiny_model(name)
    index = ModelIndex.from_config(name, model.config)
    planted = dataclasses.replace(architectures.lookup(index.architecture), **wrong)
    difference = first_difference(model, DecoderGraph(model, index, planted))
    assert difference is not None
    assert (difference.layer, difference.part) == where


def test_a_description_naming_missing_modules_is_refused():
    model = builtin.tiny_model("tiny-olmo2")
    index = ModelIndex.from_config("tiny-olmo2", model.config)
    planted = dataclasses.replace(architectures.lookup("olmo2"), norms=Norms(placement="pre"))  # Llama's norms
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(architectures.REGISTRY, "olmo2", planted)
    try:
        with pytest.raises(DescriptionMismatch, match="names 'model.layers.0.input_layernorm', which the model"):
            checked_graph(model, index)
    finally:
        monkeypatch.undo()


def test_apply_refuses_a_wrong_description_at_the_model_line(in_tmp, monkeypatch):
    recipe = write(in_tmp / "r.surg", 'model "tiny-granite"\ndrop attention layers 1\n')
    wrong = dataclasses.replace(architectures.REGISTRY["granite"], logits_divisor=Scale())
    monkeypatch.setitem(architectures.REGISTRY, "granite", wrong)
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 1
    assert "r.surg:1:7: error: the 'granite' description does not reproduce the Hugging Face model: logits" in (
        result.err
    )
    assert not Path("out").exists()


# ONNX against the Hugging Face model itself.


EDITS = {"none": None, "attention": DropAttention, "mlp": DropMlp, "block": DropBlock}
PROMPTS = {
    "default": None,
    # Phi-3's longrope switches tables at 32 positions: a prompt that stays below it.
    "short": ("Hi there", "A short one"),
}


@pytest.mark.parametrize("name", ALL_TINY)
@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("kv_cache", [True, False])
def test_onnx_matches_the_hugging_face_model(name, edit, kv_cache, tmp_path):
    graph = tiny_graph(name)
    layers = (1, 4)
    if EDITS[edit] is not None:
        run_pass(EDITS[edit](layers=layers), graph)
    export_decoder(graph, str(tmp_path), ExportOptions(kv_cache=kv_cache))
    model = graph.model
    if edit != "none":
        edit_like_graph(model, edit, layers)
    tokenizer = builtin.byte_tokenizer()
    prompt_sets = ("default", "short") if name == "tiny-phi3" else ("default",)
    for prompts in prompt_sets:
        extra = {"prompts": PROMPTS[prompts]} if PROMPTS[prompts] else {}
        # HF's own cache for the unedited model; an edited one recomputes the whole sequence
        # (HF's cache bookkeeping assumes every layer attends), which is the ground truth anyway.
        hf_cache = kv_cache and edit == "none"
        trace = trace_reference(HuggingFaceForward(model), tokenizer, hf_cache, 6, **extra)
        trace = dataclasses.replace(trace, kv_cache=kv_cache)
        check = compare(trace, str(tmp_path), 1e-4, threads=1)
        assert check.passed, f"{prompts}: {check.reason}"
        assert check.max_abs_logit_diff <= 1e-4


def test_phi3_longrope_uses_both_tables(tmp_path):
    """Short and long sequences read different rotary tables (the If picks by total length)."""
    graph = tiny_graph("tiny-phi3")
    result = export_decoder(graph, str(tmp_path), ExportOptions())
    assert result.op_counts["If"] == 1
    tables = graph.rotary.tables(None, 256)
    assert tables.switch_at == 32 and tables.cos.shape[0] == 32 and tables.long_cos.shape[0] == 256
    assert not np.allclose(tables.cos[:32], tables.long_cos[:32])


# Every statement that makes sense for a family works on it, end to end.

FAMILY_RECIPE = """model "{name}"
calibrate on "wikitext-2-valid" samples 4 length 32
drop attention least important 1 by similarity
drop mlp layers 2
quantize {part} layers 0..1 to int8
fuse layer 3 into head weight 0.1
"""


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_each_new_family_applies_a_recipe_of_every_kind(name, in_tmp):
    part = "mlp" if name == "tiny-deepseek-v2" else "attention"  # latent attention is not quantized yet
    recipe = write(in_tmp / "r.surg", FAMILY_RECIPE.format(name=name, part=part))
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    assert "verification (before quantization): max |logit diff|" in result.out
    split = write(in_tmp / "s.surg", f'model "{name}"\nsplit mlp layers 1 into 4 experts top 4\n')
    result = run_cli("apply", split, "-o", "split")
    model_type = builtin.tiny_config(name).model_type
    if model_type in ("gemma", "gemma3_text", "nemotron"):  # GeGLU, squared ReLU: refused at check, with the reason
        assert result.code == 1 and "split experts are SwiGLU" in result.err
    elif model_type == "gpt_oss":
        assert result.code == 1 and "already mixtures of experts" in result.err
    else:
        assert result.code == 0, result.err


def test_a_checkpoint_is_checked_once_per_description(tmp_path, monkeypatch):
    """The verdict is cached by folder files and description; another description is checked anew."""
    from surgery.architectures import conformance
    from surgery.models.loading import load_model
    from surgery.models.specs import resolve_spec

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "granite"
    builtin.tiny_model("tiny-granite").save_pretrained(folder)
    builtin.byte_tokenizer().save_pretrained(folder)
    model, _, _ = load_model(resolve_spec(str(folder)), lambda *_: None)
    index = ModelIndex.from_config("granite", model.config)
    calls = []
    real = conformance.first_difference
    monkeypatch.setattr(conformance, "first_difference", lambda *a, **k: calls.append(1) or real(*a, **k))
    checked_graph(model, index)
    checked_graph(model, index)
    assert len(calls) == 1  # the second load reuses the verdict
    wrong = dataclasses.replace(architectures.REGISTRY["granite"], logits_divisor=Scale())
    monkeypatch.setitem(architectures.REGISTRY, "granite", wrong)
    with pytest.raises(DescriptionMismatch, match="logits differs"):
        checked_graph(model, index)
    assert len(calls) == 2


def test_exporting_tables_leaves_the_models_rotary_state_alone():
    """transformers' longrope module switches its frequencies in place per call; the exporter runs
    beside verification's PyTorch trace, so computing tables must not touch the model's module."""
    graph = tiny_graph("tiny-phi3")
    module = graph.rotary.module
    graph.rotary.cos_sin(torch.zeros(1, 1), torch.arange(8)[None], None)  # short factors now
    short = module.inv_freq.clone()
    graph.rotary.tables(None, 256)  # reads the long factors too
    assert torch.equal(module.inv_freq, short)


def test_partial_rotary_is_refused_only_where_onnxruntime_cannot_rotate_it():
    from surgery.models.index import ModelIndex

    config = builtin.tiny_config("tiny-phi4-mini")
    assert not ModelIndex.from_config("tiny-phi4-mini", config).unsupported_reasons()
    config.partial_rotary_factor = 0.25  # 8 of 32 dimensions: GroupQueryAttention's tables need 16
    config.rope_parameters["partial_rotary_factor"] = 0.25
    problems = ModelIndex.from_config("tiny-phi4-mini", config).unsupported_reasons()
    assert any("rotates 8 of 32 dimensions" in problem for problem in problems)
