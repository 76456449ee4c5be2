"""Inputs checked against each other and read safely: weights against their files and the
config, side files (importance files, texts) that must be regular, bounded and never quoted,
and what `check` decides so that `apply` cannot fail later."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from conftest import run_cli, write
from surgery.models import builtin


@pytest.fixture
def model_folder(in_tmp) -> Path:
    """tiny-llama saved as a Hugging Face folder (safetensors, config, tokenizer)."""
    folder = in_tmp / "model"
    builtin.tiny_model("tiny-llama").save_pretrained(folder)
    builtin.byte_tokenizer().save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def _apply(in_tmp: Path, model: str = "model") -> tuple:
    recipe = write(in_tmp / "r.surg", f'# edited\nmodel "{model}"\ndrop attention layers 1\n')
    return run_cli("apply", recipe, "-o", "out"), recipe


def test_config_with_more_layers_than_the_weights_is_refused(in_tmp, model_folder):
    _edit_config(model_folder, num_hidden_layers=8)
    result, recipe = _apply(in_tmp)
    assert result.code == 1
    assert "r.surg:2:7: error: 18 tensor(s) the config expects are missing from model.safetensors" in result.err
    assert "'model.layers.6.input_layernorm.weight'" in result.err
    assert "config.json says num_hidden_layers 8, but the weights hold 6 layers" in result.err
    assert not (in_tmp / "out").exists() and "Traceback" not in result.err
    assert run_cli("check", recipe).code == 0  # the config alone is consistent


def test_config_with_fewer_layers_than_the_weights_is_refused(in_tmp, model_folder):
    _edit_config(model_folder, num_hidden_layers=4)
    result, _ = _apply(in_tmp)
    assert result.code == 1
    assert "18 tensor(s) in model.safetensors are not part of the model the config describes" in result.err
    assert "'model.layers.4.input_layernorm.weight'" in result.err
    assert "num_hidden_layers 4, but the weights hold 6 layers" in result.err
    assert not (in_tmp / "out").exists()


def test_shapes_that_disagree_name_the_tensor(in_tmp, model_folder):
    _edit_config(model_folder, intermediate_size=128)
    result, _ = _apply(in_tmp)
    assert result.code == 1 and "Traceback" not in result.err
    assert "18 tensor(s) have shapes the config does not expect" in result.err
    assert "'model.layers.0.mlp.down_proj.weight' in model.safetensors is (64, 160), the config needs (64, 128)" in (
        result.err
    )


def test_truncated_weights_name_the_file_and_tensor(in_tmp, model_folder):
    weights = model_folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    result, _ = _apply(in_tmp)
    assert result.code == 1
    assert "weights file 'model.safetensors', tensor 'model.layers.5.self_attn.v_proj.weight'" in result.err
    assert "the file is truncated" in result.err


def test_a_header_that_lies_about_a_tensor_is_caught(in_tmp, model_folder):
    weights = model_folder / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["model.norm.weight"]["shape"] = [65]  # 64 floats stored, 65 claimed
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    weights.write_bytes(data[:8] + raw + data[8 + length :])
    result, _ = _apply(in_tmp)
    assert result.code == 1
    assert "tensor 'model.norm.weight': the header says 256 bytes, but F32 (65,) needs 260" in result.err


def test_garbage_weights_and_nan_weights_are_messages(in_tmp, model_folder):
    weights = model_folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"\xff" * 64)
    result, _ = _apply(in_tmp)
    assert result.code == 1 and "weights file 'model.safetensors' is truncated or not safetensors" in result.err
    from safetensors.numpy import load, save

    tensors = load(original)
    tensors["model.norm.weight"][3] = float("nan")
    weights.write_bytes(save(tensors))
    result, _ = _apply(in_tmp)
    assert result.code == 1
    assert "tensor 'model.norm.weight' in model.safetensors holds NaN or infinite values" in result.err


def test_an_implausible_config_is_refused_at_check(in_tmp, model_folder):
    _edit_config(model_folder, num_hidden_layers=10**9)
    recipe = write(in_tmp / "r.surg", 'model "model"\ndrop attention layers *\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "num_hidden_layers 1000000000 is outside 1..4096" in result.err


def test_a_folder_without_tokenizer_files_is_a_message(in_tmp, model_folder):
    for name in os.listdir(model_folder):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(model_folder / name)
    result, _ = _apply(in_tmp)
    assert result.code == 1 and "Traceback" not in result.err, result.err


# Side files: importance files and texts.


def test_an_importance_file_that_is_not_json_is_not_quoted(in_tmp):
    (in_tmp / "secrets.env").write_text("API_KEY=hunter2-very-secret\n")
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\ndrop block least important 1 by "secrets.env"\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "secrets.env:1:1: error: importance file: not valid JSON" in result.err
    assert "hunter2" not in result.err and "API_KEY" not in result.err


def test_the_environment_never_reaches_the_log(in_tmp):
    # /proc/self/environ holds the environment the process started with, NUL-separated.
    entries = [e for e in Path("/proc/self/environ").read_bytes().split(b"\0") if b"=" in e]
    values = [e.split(b"=", 1)[1].decode("utf-8", "replace") for e in entries]
    values = [v for v in values if len(v) >= 8]
    assert values
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\ndrop block least important 1 by "/proc/self/environ"\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert not [v for v in values if v in result.err]


def test_json_that_is_not_an_importance_file_is_not_quoted(in_tmp):
    (in_tmp / "creds.json").write_text('{\n  "password": "hunter2"\n}\n')
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\ndrop block least important 1 by "creds.json"\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "'creds.json' is not an importance file" in result.err and "hunter2" not in result.err


@pytest.mark.parametrize(
    "name, expected",
    [
        ("/dev/zero", "is not a regular file"),
        ("folder", "is a folder, not a file"),
        ("binary.bin", "is not valid UTF-8"),
        ("x" * 300, "not a file and not a built-in text"),
    ],
)
def test_texts_must_be_regular_utf8_files(in_tmp, name, expected):
    (in_tmp / "folder").mkdir()
    (in_tmp / "binary.bin").write_bytes(b"text\n\xff\xfe binary")
    recipe = write(
        in_tmp / "r.surg",
        f'model "tiny-llama"\ncalibrate on "{name}" samples 1 length 2\n'
        "drop attention least important 1 by similarity\n",
    )
    result = run_cli("check", recipe)
    assert result.code == 1, result.err
    assert "r.surg:2:14: error:" in result.err and expected in result.err


@pytest.mark.parametrize("name", ["/dev/zero", "folder", "big.json", "deep.json", "huge-number.json"])
def test_importance_files_are_bounded_regular_files(in_tmp, name):
    (in_tmp / "folder").mkdir()
    (in_tmp / "big.json").write_text(" " * (2 << 20))
    (in_tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    base = json.loads((Path(__file__).parent / "golden/errors/bad-importance.json").read_text())
    text = json.dumps(base).replace("0.1", "1" * 5000)
    (in_tmp / "huge-number.json").write_text(text)
    recipe = write(in_tmp / "r.surg", f'model "tiny-llama"\ndrop block least important 1 by "{name}"\n')
    result = run_cli("check", recipe)
    assert result.code == 1 and "Traceback" not in result.err and "internal error" not in result.err, result.err


# What check decides so that apply cannot fail later.


def test_calibration_too_short_for_the_samples_fails_at_check(in_tmp):
    (in_tmp / "short.txt").write_text("a short text\n" * 20)
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-llama"\ncalibrate on "short.txt" samples 64 length 64\n'
        "drop attention least important 2 by similarity\n",
    )
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:2:1: error: 'short.txt' has 260 tokens: 4 windows of 64, fewer than the 64 samples" in result.err


def test_calibration_of_a_model_without_its_tokenizer_is_bounded_by_bytes(in_tmp, model_folder):
    for name in os.listdir(model_folder):
        if name.startswith("tokenizer"):
            os.remove(model_folder / name)
    (in_tmp / "short.txt").write_text("tiny\n")
    recipe = write(
        in_tmp / "r.surg",
        'model "model"\ncalibrate on "short.txt" samples 8 length 64\ndrop attention least important 2 by similarity\n',
    )
    result = run_cli("check", recipe)
    assert result.code == 1 and "'short.txt' has at most 6 tokens" in result.err


def test_merge_rank_beyond_the_experts_is_an_error_at_check(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "tiny-mixtral"\nmerge experts layers * to 2 rank 1000\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:2:34: error: rank 1000 is not below the experts' full rank 48 (layer(s) 0..5)" in result.err
    planned = run_cli("plan", recipe)
    assert planned.code == 1 and "internal error" not in planned.err


def test_merging_a_layer_twice_is_an_error_at_check(in_tmp):
    recipe = write(
        in_tmp / "r.surg", 'model "tiny-qwen2-moe"\nmerge experts layers 1..2 to 1\nmerge experts layers 2..3 to 2\n'
    )
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:3:15: error: layer(s) 2 are merged twice" in result.err and "already merged at" in result.err


def test_merge_of_layers_never_split_is_an_error_at_check(in_tmp):
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-llama"\nsplit mlp layers 0..2 into 4 experts top 4\nmerge experts layers 2..4 to 2\n',
    )
    result = run_cli("check", recipe)
    assert result.code == 1 and "layer(s) 3..4 have no experts to merge" in result.err


def test_merge_after_an_importance_split_is_decided_by_the_plan(in_tmp):
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-llama"\nsplit mlp least important 2 by zd into 4 experts top 4\nmerge experts layers 0..5 to 2\n',
    )
    assert run_cli("check", recipe).code == 0  # which layers are split is known only from the scores
    planned = run_cli("plan", recipe)
    assert planned.code == 1 and "have no experts to merge" in planned.err and "internal error" not in planned.err


def test_verify_perplexity_on_a_short_context_model_uses_windows_it_can_take(in_tmp):
    # tiny models take 256 positions; the default window is 512.
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-llama"\ndrop attention layers 1\n'
        'verify perplexity on "wikitext-2-test" max-increase 90% tokens 1024\n',
    )
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code in (0, 3), result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    assert report["perplexity"]["original_pytorch"]["window"] == 256


def test_verify_perplexity_text_too_short_fails_at_check(in_tmp):
    (in_tmp / "tiny.txt").write_text("too short")
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\nverify perplexity on "tiny.txt" max-increase 10%\n')
    result = run_cli("check", recipe)
    assert result.code == 1 and "'tiny.txt' has 9 tokens, too few for a perplexity" in result.err


# Reading an output folder back.


@pytest.fixture
def output(in_tmp) -> Path:
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\ndrop attention layers 1\n')
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0
    return in_tmp / "out"


def test_run_and_eval_on_a_truncated_data_file_are_messages(output):
    data = output / "model.onnx.data"
    os.truncate(data, data.stat().st_size // 2)
    for argv in (("run", str(output), "--prompt", "hi"), ("eval", str(output), "--max-tokens", "64")):
        result = run_cli(*argv)
        assert result.code == 1, result.err
        assert "'model.onnx.data' is truncated: tensor" in result.err and "Traceback" not in result.err


def test_run_without_tokenizer_and_with_a_damaged_model_are_messages(output):
    shutil.copy(output / "model.onnx", output / "model.onnx.bak")
    for name in os.listdir(output):
        if name.startswith("tokenizer"):
            os.remove(output / name)
    result = run_cli("run", str(output), "--prompt", "hi")
    assert result.code == 1 and "cannot load the tokenizer" in result.err
    (output / "model.onnx").write_bytes(b"not a model")
    result = run_cli("eval", str(output))
    assert result.code == 1 and "model.onnx' is damaged" in result.err


def test_eval_window_longer_than_the_context_is_a_message(output):
    result = run_cli("eval", str(output), "--window", "4096")
    assert result.code == 1
    assert "--window 4096 is longer than the model's context of 256 tokens" in result.err


def test_run_past_the_context_is_a_message(output):
    result = run_cli("run", str(output), "--prompt", "x" * 300)
    assert result.code == 1 and "exceed the model's context of 256 tokens" in result.err


def test_importance_output_replaces_only_an_importance_file(in_tmp):
    (in_tmp / "notes.json").write_text('{"mine": true}')
    result = run_cli("importance", "--model", "tiny-llama", "--metric", "zd", "-o", "notes.json")
    assert result.code == 1 and "is not a file surgery wrote" in result.err
    assert json.loads((in_tmp / "notes.json").read_text()) == {"mine": True}
    assert run_cli("importance", "--model", "tiny-llama", "--metric", "zd", "-o", "imp.json").code == 0
    assert run_cli("importance", "--model", "tiny-llama", "--metric", "zd", "-o", "imp.json").code == 0
    assert sorted(os.listdir(in_tmp)) == ["imp.json", "notes.json"]
