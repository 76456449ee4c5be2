"""The `surgery` command end to end on a tiny model: exit codes, output folder, report."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from conftest import run_cli, write
from surgery import __version__
from surgery.formats.precision import FP32, PRECISIONS

RECIPE = 'model "tiny-llama"\ndrop attention layers 1..2\ndrop mlp layers last 1\nexport onnx\n'


def test_version():
    result = run_cli("--version")
    assert result.code == 0 and __version__ in result.out


def test_usage_error_exits_2():
    assert run_cli("apply").code == 2
    assert run_cli("frobnicate", "x").code == 2


def test_apply_writes_a_complete_verified_folder(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    files = set(os.listdir(in_tmp / "out"))
    assert {"model.onnx", "model.onnx.data", "surgery.json", "recipe.surg", "tokenizer.json"} <= files
    assert (in_tmp / "out" / "recipe.surg").read_text() == RECIPE
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    assert report["verification"]["passed"] is True
    assert report["verification"]["max_abs_logit_diff"] <= 1e-3
    assert report["kv_cache"]["slots"] == {"0": 0, "1": 3, "2": 4, "3": 5}
    assert report["kv_cache"]["removed_layers"] == [1, 2]
    assert report["model"]["before"]["attention_layers"] == [0, 1, 2, 3, 4, 5]
    assert report["model"]["after"]["attention_layers"] == [0, 3, 4, 5]
    assert report["model"]["after"]["mlp_layers"] == [0, 1, 2, 3, 4]
    assert report["model"]["after"]["parameters"] < report["model"]["before"]["parameters"]
    assert report["model"]["after"]["bytes"] == sum(
        os.path.getsize(in_tmp / "out" / f) for f in ("model.onnx", "model.onnx.data")
    )
    assert set(report["timings_s"]) >= {"parse_check", "load", "passes", "export", "verify", "total"}
    assert [p["action"] for p in report["passes"]] == ["drop attention", "drop mlp"]
    assert report["passes"][0]["source"]["line"] == 2
    # No temporary folders are left behind.
    assert sorted(os.listdir(in_tmp)) == ["out", "r.surg"]


def test_existing_output_is_refused_without_force(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    (in_tmp / "out").mkdir()
    (in_tmp / "out" / "keep.txt").write_text("mine")
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 1 and "already exists" in result.err
    assert (in_tmp / "out" / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier output of surgery: a folder of someone's files stays.
    forced = run_cli("apply", recipe, "-o", "out", "--force", "--no-verify")
    assert forced.code == 1 and "was not written by `surgery apply`" in forced.err
    assert (in_tmp / "out" / "keep.txt").read_text() == "mine"
    assert run_cli("apply", recipe, "-o", "ours", "--no-verify").code == 0
    assert run_cli("apply", recipe, "-o", "ours", "--force", "--no-verify").code == 0
    assert sorted(os.listdir(in_tmp)) == ["ours", "out", "r.surg"]


def test_output_may_not_replace_an_input(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    result = run_cli("apply", recipe, "-o", str(in_tmp), "--force")
    assert result.code == 1 and "would replace an input" in result.err
    assert (in_tmp / "r.surg").read_text() == RECIPE


def test_recipe_errors_exit_1_without_traceback(in_tmp):
    recipe = write(in_tmp / "bad.surg", 'model "tiny-llama"\ndrop attention layers 3..9\n')
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 1
    assert "bad.surg:2:26: error: layer 9 is out of range" in result.err
    assert "Traceback" not in result.err
    assert not (in_tmp / "out").exists()


def test_model_override(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    result = run_cli("plan", recipe, "--model", "tiny-qwen3", "--json")
    assert result.code == 0
    plan = json.loads(result.out)
    assert plan["model"]["architecture"] == "qwen3"
    assert plan["steps"][0]["targets"] == ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    assert plan["steps"][0]["source"]["line"] == 2


def test_missing_recipe_file_is_a_user_error(in_tmp):
    result = run_cli("check", "nope.surg")
    assert result.code == 1 and "nope.surg" in result.err


def test_failed_verification_exits_3_and_keeps_the_output(in_tmp, monkeypatch):
    monkeypatch.setitem(PRECISIONS, "fp32", replace(FP32, tolerance=0.0))
    recipe = write(in_tmp / "r.surg", RECIPE)
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 3
    assert "verification failed" in result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    assert report["verification"]["passed"] is False
    assert "exceeds the tolerance" in report["verification"]["reason"]


def test_an_output_that_failed_its_check_is_not_used_until_accepted(in_tmp, monkeypatch):
    """Kept for inspection, but marked: its report says so, genai cannot load it, `run` and
    `eval` refuse it without --allow-failed, and `surgery accept` makes it usable."""
    monkeypatch.setitem(PRECISIONS, "fp32", replace(FP32, tolerance=0.0))
    recipe = write(in_tmp / "r.surg", RECIPE)
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 3 and "marked as failed" in result.err and "surgery accept out" in result.err
    verdict = json.loads((in_tmp / "out" / "surgery.json").read_text())["verdict"]
    assert verdict["passed"] is False and verdict["accepted"] is None
    assert verdict["failed"][0].startswith("verification against PyTorch: ")
    assert not (in_tmp / "out" / "genai_config.json").exists()
    assert (in_tmp / "out" / "genai_config.json.failed-check").exists()
    run, evaluate = ("run", "out", "--prompt", "hi", "--max-new-tokens", "2"), ("eval", "out", "--max-tokens", "64")
    for command in (run, (*evaluate, "--window", "32")):
        refused = run_cli(*command)
        assert refused.code == 1 and "failed its checks when it was written" in refused.err, command
        allowed = run_cli(*command, "--allow-failed")
        assert allowed.code == 0, allowed.err
        assert "warning: 'out' failed its checks" in allowed.err
    accepted = run_cli("accept", "out")
    assert accepted.code == 0 and "accepted out" in accepted.out
    assert (in_tmp / "out" / "genai_config.json").exists()
    assert json.loads((in_tmp / "out" / "surgery.json").read_text())["verdict"]["accepted"]["at"]
    used = run_cli("run", "out", "--prompt", "hi", "--max-new-tokens", "2")
    assert used.code == 0 and "warning" not in used.err
    assert run_cli("accept", "out").code == 1  # nothing left to accept


def test_an_output_that_passed_says_so_and_cannot_be_accepted(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    assert run_cli("apply", recipe, "-o", "out").code == 0
    verdict = json.loads((in_tmp / "out" / "surgery.json").read_text())["verdict"]
    assert verdict == {"passed": True, "checked": True, "failed": [], "accepted": None}
    refused = run_cli("accept", "out")
    assert refused.code == 1 and "passed its checks; there is nothing to accept" in refused.err


@pytest.mark.parametrize("kv", ["", " without kv-cache"])
def test_run_generates_text(in_tmp, kv):
    recipe = write(in_tmp / "r.surg", RECIPE.replace("export onnx", "export onnx" + kv))
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0
    result = run_cli("run", "out", "--prompt", "hello", "--max-new-tokens", "5")
    assert result.code == 0, result.err
    assert result.out.startswith("hello")
    assert "5 tokens" in result.err


def test_run_chat_needs_a_chat_template(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0
    result = run_cli("run", "out", "--prompt", "hi", "--chat")
    assert result.code == 1 and "no chat template" in result.err


def test_run_refuses_a_folder_without_a_model(in_tmp):
    result = run_cli("run", str(in_tmp), "--prompt", "x")
    assert result.code == 1 and "no model.onnx" in result.err


def test_local_model_folder(in_tmp):
    # A Hugging Face folder on disk: the tiny model saved with its tokenizer.
    from surgery.models import builtin

    builtin.tiny_model("tiny-qwen2").save_pretrained(in_tmp / "my-model")
    builtin.byte_tokenizer().save_pretrained(in_tmp / "my-model")
    recipe = write(in_tmp / "r.surg", 'model "my-model"\ndrop block layers 2\n')
    before = sorted(p.name for p in (in_tmp / "my-model").iterdir())
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    assert report["plan"]["model"] == {"spec": "my-model", "kind": "folder", "architecture": "qwen2", "layers": 6}
    assert report["verification"]["passed"]
    # The input model is untouched, and cannot be the output.
    assert sorted(p.name for p in (in_tmp / "my-model").iterdir()) == before
    refused = run_cli("apply", recipe, "-o", "my-model", "--force")
    assert refused.code == 1 and "would replace an input" in refused.err


def test_unloadable_weights_point_at_the_model_line(in_tmp):
    # A folder whose config is fine but whose weights are pickled: refused at `check` already.
    import torch

    from surgery.models import builtin

    folder = in_tmp / "pickled"
    builtin.tiny_config("tiny-llama").save_pretrained(folder)
    torch.save({}, folder / "pytorch_model.bin")
    recipe = write(in_tmp / "r.surg", '# pickled weights\nmodel "pickled"\ndrop mlp layers 1\n')
    for command in (("check", recipe), ("apply", recipe, "-o", "out")):
        result = run_cli(*command)
        assert result.code == 1
        assert "r.surg:2:7: error: folder 'pickled' has only pickled .bin weights, no safetensors" in result.err
        assert "surgery loads safetensors only" in result.err
        assert "Traceback" not in result.err
    assert not (in_tmp / "out").exists()
    assert not (in_tmp / "out").exists()


def test_a_cuda_export_verified_on_the_cpu_says_so_and_run_says_where_it_runs(in_tmp):
    cuda = 'model "tiny-llama"\ndrop attention layers 1\nexport onnx for cuda precision fp32\n'
    recipe = write(in_tmp / "r.surg", cuda)
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    assert "warning: exported for cuda but verified on onnxruntime's CPU provider" in result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    assert report["export"]["target"] == "cuda" and report["verification"]["provider"] == "cpu"
    assert any("verified on onnxruntime's CPU provider" in w for w in report["warnings"])
    ran = run_cli("run", "out", "--prompt", "hi", "--max-new-tokens", "2")
    assert ran.code == 0
    assert "note: 'out' was exported for cuda (fp32); running it on onnxruntime's CPU provider here" in ran.err
    cpu = write(in_tmp / "cpu.surg", 'model "tiny-llama"\ndrop attention layers 1\n')
    assert run_cli("apply", cpu, "-o", "cpu-out").code == 0
    assert "note:" not in run_cli("run", "cpu-out", "--prompt", "hi", "--max-new-tokens", "2").err


def test_a_quantized_outputs_summary_leads_with_kl_and_top1(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\nquantize layers to int4\n')
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[2].startswith("  quality: quantized vs the same layers in PyTorch fp32: mean KL ")
    assert "top-1 agreement" in lines[2]
    assert any(line.startswith("  logits moved by quantization (informational") for line in lines[3:])
    moved = json.loads((in_tmp / "out" / "surgery.json").read_text())["quantization"]["against_pytorch_fp32"]
    assert moved["mean_kl"] >= 0 and 0 <= moved["top1_agreement"] <= 1 and moved["positions"] > 0


def test_a_misspelt_built_in_gets_a_did_you_mean(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "smolm2-135m"\ndrop attention layers 2\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "model 'smolm2-135m' not found; did you mean 'smollm2-135m'?" in result.err


def test_models_lists_the_built_ins_and_the_families():
    result = run_cli("models", "--json")
    assert result.code == 0
    listed = json.loads(result.out)
    names = [m["name"] for m in listed["builtin_models"]]
    assert names[:2] == ["smollm2-135m", "gemma3-270m"] and "tiny-llama" in names
    assert "4-bit grid" in listed["builtin_models"][0]["what"]
    assert {"llama", "qwen2", "gemma3_text", "mixtral"} <= set(listed["families"])
    assert "smollm2-135m" in run_cli("models").out


def test_check_json_says_ok_or_lists_every_diagnostic(in_tmp):
    good = write(in_tmp / "good.surg", RECIPE)
    result = run_cli("check", good, "--json")
    assert result.code == 0
    assert json.loads(result.out) == {"ok": True, "recipe": good, "model": "tiny-llama", "architecture": "llama",
                                      "layers": 6, "selections_resolved": True, "diagnostics": []}  # fmt: skip
    bad = write(in_tmp / "bad.surg", 'model "tiny-llama"\ndrop attention layers 3..9\ndrop mlp layers 12\n')
    result = run_cli("check", bad, "--json")
    assert result.code == 1
    content = json.loads(result.out)
    assert content["ok"] is False
    assert [(d["severity"], d["at"]["line"]) for d in content["diagnostics"]] == [("error", 2), ("error", 3)]


def test_check_warns_as_plan_does_when_the_plan_needs_no_model(in_tmp):
    text = 'model "tiny-llama"\ndrop attention layers 1..5\nquantize attention layers 2 to int8\n'
    recipe = write(in_tmp / "r.surg", text)
    checked, planned = run_cli("check", recipe), run_cli("plan", recipe)
    assert checked.code == planned.code == 0
    assert "r.surg:3:1: warning: this quantize selection matches no layers" in checked.err
    assert "r.surg:3:1: warning: this quantize selection matches no layers" in planned.err
    by_importance = write(in_tmp / "i.surg", 'model "tiny-llama"\ndrop attention least important 2 by similarity\n')
    result = run_cli("check", by_importance)
    assert result.code == 0 and "resolved by `surgery plan`, which may warn about them" in result.out
