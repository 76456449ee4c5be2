"""A checked checkpoint loads without transformers' model classes (surgery.models.skeleton), and
nothing downstream can tell: the same rotary tables bit for bit, the same parameters bound to
the same tensors, the same exported bytes."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from test_lazy import saved

from conftest import REPO
from surgery.architectures import lookup
from surgery.architectures.conformance import already_checked, checked_config, checked_graph
from surgery.export.decoder import export_decoder
from surgery.export.genai import genai_config
from surgery.export.options import ExportOptions
from surgery.models import builtin
from surgery.models.index import ModelIndex
from surgery.models.loading import load_model
from surgery.models.skeleton import FAMILIES, RotaryEmbedding
from surgery.models.specs import resolve_spec

SKELETON_MODELS = [name for name, m in builtin.TINY_MODELS.items() if m.architecture in FAMILIES]


def _graph(folder, checked_before=None):
    model, _, weights = load_model(resolve_spec(str(folder)), lambda *_: None, lazy=True,
                                   checked_before=checked_before)  # fmt: skip
    return model, checked_graph(model, ModelIndex.from_config(folder.name, model.config), weights)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_family_it_serves_has_llamas_rotary_code():
    """The families listed run transformers' LlamaRotaryEmbedding code (else they must not be listed)."""
    import inspect

    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def body(cls) -> str:
        return inspect.getsource(cls).replace(cls.__name__, "X").split("\n", 1)[1]

    for family in FAMILIES:
        model = builtin.tiny_model(next(n for n in SKELETON_MODELS if builtin.TINY_MODELS[n].architecture == family))
        rotary = type(model.model.rotary_emb)
        assert body(rotary).replace(family.capitalize(), "") == body(LlamaRotaryEmbedding).replace("Llama", ""), family


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])  # fmt: skip
@pytest.mark.parametrize("name", SKELETON_MODELS)
def test_the_rotary_tables_are_transformers_own_bit_for_bit(name, scaling):
    model = builtin.tiny_model(name)
    config = model.config
    if scaling is not None:
        config.rope_parameters = {**config.rope_parameters, **scaling}
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    ours = RotaryEmbedding(config)
    positions = torch.arange(0, 200)[None].repeat(2, 1)
    probe = torch.zeros(1, dtype=torch.float32)
    for a, b in zip(ours(probe, positions), model.model.rotary_emb(probe, positions), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", SKELETON_MODELS)
def test_a_checked_checkpoint_exports_the_same_bytes_without_transformers_model_classes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved(name, tmp_path / name)
    architecture = lookup(builtin.TINY_MODELS[name].architecture)
    assert not already_checked(str(folder), architecture)
    hf_model, hf_graph = _graph(folder)  # the usual load, which checks the description and marks it
    assert already_checked(str(folder), architecture)
    model, graph = _graph(folder, checked_config)
    assert not isinstance(model, type(hf_model))  # the module tree, not transformers' class
    assert type(model.config).__name__ == "PreTrainedConfig"  # rebuilt from the check's record
    assert graph.tied_head == hf_graph.tied_head
    names = sorted(graph.weights.names.values())
    assert names == sorted(hf_graph.weights.names.values())
    outputs = []
    for label, g in (("hf", hf_graph), ("skeleton", graph)):
        (tmp_path / label).mkdir()
        export = export_decoder(g, str(tmp_path / label), ExportOptions())
        outputs.append([_digest(tmp_path / label / f) for f in ("model.onnx", "model.onnx.data")]
                       + [genai_config(g, export.context_length, kv_cache=True, position_ids=False)])  # fmt: skip
    assert outputs[0] == outputs[1]
    assert model.generation_config.to_dict() == hf_model.generation_config.to_dict()


def test_an_unchecked_checkpoint_loads_the_usual_way(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder = saved("tiny-llama", tmp_path / "tiny-llama")
    model, _ = _graph(folder, lambda folder, architecture: None)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_a_second_apply_imports_no_model_class(tmp_path):
    """End to end: the first apply checks the checkpoint, the second loads it without ever
    importing transformers' Llama model code."""
    folder = saved("tiny-llama", tmp_path / "tiny-llama")
    recipe = tmp_path / "r.surg"
    recipe.write_text(f'model "{folder}"\ndrop attention layers 1\n')
    env_code = (
        "import sys, os; from surgery.cli import main;"
        f"code = main(['apply', {str(recipe)!r}, '-o', {str(tmp_path / 'out')!r}, '--force', '--no-verify']);"
        "print('MODELING', 'transformers.models.llama.modeling_llama' in sys.modules);"
        "print('AUTO', 'transformers.models.auto.modeling_auto' in sys.modules);"
        "print('TOKENIZER', 'transformers.models.auto.tokenization_auto' in sys.modules); sys.exit(code)"
    )
    env = {"SURGERY_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    runs = [subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, cwd=REPO, env=env)
            for _ in range(2)]  # fmt: skip
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr
    assert "MODELING True" in runs[0].stdout
    assert "MODELING False" in runs[1].stdout
    # Nor transformers' auto classes, which the family's config module and AutoTokenizer import.
    assert "AUTO False" in runs[1].stdout and "TOKENIZER False" in runs[1].stdout
    written = {name: (tmp_path / "out" / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    assert written == {name: (folder / name).read_bytes() for name in written}  # copied as they are
