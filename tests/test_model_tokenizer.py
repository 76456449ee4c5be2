"""A run's tokenizer loads only when something tokenizes; an export copies the folder's tokenizer
files as they are, and saves the loaded tokenizer only when the folder has no tokenizer.json."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from surgery.export.genai import token_ids
from surgery.models.tokenizer import ModelTokenizer


def _never():
    raise AssertionError("the tokenizer was loaded")


class _Saving:
    pad_token_id = 7

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("saved")


def test_a_folder_with_its_tokenizer_files_is_copied_without_loading(tmp_path):
    source, out = tmp_path / "model", tmp_path / "out"
    source.mkdir(), out.mkdir()
    files = {"tokenizer.json": "{}", "tokenizer_config.json": '{"a": 1}', "chat_template.jinja": "x"}
    for name, text in {**files, "config.json": "{}"}.items():
        (source / name).write_text(text)
    ModelTokenizer(_never, str(source)).save(out)
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_folder_without_tokenizer_json_saves_the_loaded_tokenizer(tmp_path):
    source, out = tmp_path / "model", tmp_path / "out"
    source.mkdir(), out.mkdir()
    (source / "tokenizer_config.json").write_text("{}")
    handle = ModelTokenizer(_Saving, str(source))
    assert not handle.copyable()
    handle.save(out)
    assert (out / "tokenizer.json").read_text() == "saved"


@pytest.mark.parametrize(("config_pad", "loads"), [(3, False), (None, True)])
def test_genai_asks_the_tokenizer_only_for_an_id_the_configs_leave_open(config_pad, loads):
    loaded = []

    def load():
        loaded.append(True)
        return _Saving()

    config = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=config_pad)
    ids = token_ids(config, None, ModelTokenizer(load))
    assert ids["pad_token_id"] == (config_pad if config_pad is not None else 7)
    assert bool(loaded) == loads
