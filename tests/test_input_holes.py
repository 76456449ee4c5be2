"""The five holes a probe of the input handling found (issue 25), each closed: a link planted at
the lock path is never followed, a model file that is a FIFO is an error at `check`, a text
without whitespace tokenizes in bounded memory, a damaged output folder is a message, and the
built-in model's cache folder is an input. With them, the leftovers a refused run owns and the
lock file on a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli, write
from surgery.backend.output import OutputError, OutputFolder

RECIPE = 'model "tiny-llama"\ndrop attention layers 1\n'


def test_a_link_planted_at_the_lock_path_is_refused_and_never_followed(in_tmp):
    victim = in_tmp / "v.txt"
    victim.write_text("precious")
    os.symlink(victim, in_tmp / ".out.lock")
    result = run_cli("apply", write(in_tmp / "r.surg", RECIPE), "-o", "out", "--no-verify")
    assert result.code == 1
    assert "is a symbolic link; surgery does not follow it" in result.err
    assert victim.read_text() == "precious"
    assert not (in_tmp / "out").exists()


def test_a_fifo_at_the_lock_path_is_refused(in_tmp):
    os.mkfifo(in_tmp / ".out.lock")
    with pytest.raises(OutputError, match="not a regular file"):
        OutputFolder(in_tmp / "out", force=False)


def test_a_full_disk_leaves_no_lock_file(in_tmp, monkeypatch):
    real_write = os.write

    def full(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == ".out.lock":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputError, match="cannot write the lock file .*No space left"):
        OutputFolder(in_tmp / "out", force=False)
    assert not (in_tmp / ".out.lock").exists()


def test_a_refused_run_still_clears_the_leftovers_it_owns(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0
    stale = in_tmp / ".out.partial-killed"  # a killed run's staging folder: marked as ours
    stale.mkdir()
    (stale / ".surgery-output").write_text(json.dumps({"written_by": "surgery"}))
    (stale / "model.onnx.data").write_bytes(b"\0" * 1024)
    refused = run_cli("apply", recipe, "-o", "out", "--no-verify")  # no --force: refused
    assert refused.code == 1 and "already exists" in refused.err
    assert not stale.exists()
    assert "removed 1 unfinished folder(s)" in refused.err


def _tiny_folder(folder: Path) -> Path:
    from surgery.models import builtin

    builtin.tiny_model("tiny-llama").save_pretrained(folder)
    builtin.byte_tokenizer().save_pretrained(folder)
    return folder


def test_a_model_file_that_is_a_fifo_is_an_error_at_check(in_tmp):
    folder = _tiny_folder(in_tmp / "model")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    recipe = write(in_tmp / "r.surg", 'model "model"\ndrop attention layers 1\n')
    for command in ("check", "apply"):
        result = run_cli(command, recipe, *(["-o", "out", "--no-verify"] if command == "apply" else []))
        assert result.code == 1, command
        assert "model files that are not regular files: model.safetensors (a FIFO)" in result.err
    assert not (in_tmp / "out").exists()


def _peak_mb_of_check(recipe: str, cwd: Path) -> float:
    code = (
        "import resource, sys; from surgery.cli import main; code = main(['check', sys.argv[1]]);"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code, recipe], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split("PEAK")[-1])


def test_a_text_without_whitespace_tokenizes_in_bounded_memory(tmp_path):
    """8 MB of NUL bytes as calibration text: before, one 8 MB pre-token cost the tokenizer
    1.7 GB; now the check peaks within 100 MB of the same check of 8 MB of words."""
    size = 8 << 20
    (tmp_path / "nul.txt").write_bytes(b"\0" * size)
    (tmp_path / "words.txt").write_text(("the model layer " * (size // 16 + 1))[:size])
    peaks = {}
    for name in ("nul", "words"):
        recipe = write(tmp_path / f"{name}.surg", f'model "tiny-llama"\ncalibrate on "{name}.txt" samples 4 length 64\n'
                                                  "drop attention least important 1 by similarity\n")  # fmt: skip
        peaks[name] = _peak_mb_of_check(recipe, tmp_path)
    assert peaks["nul"] <= peaks["words"] + 100, peaks


def test_the_pieces_of_a_text_are_the_text(tmp_path):
    from surgery.calibration import _CHARS_PER_CALL, _LONGEST_RUN, _pieces

    text = "a b\n" * 3000 + "x" * (3 * _LONGEST_RUN + 5) + " tail\n" + "w " * _CHARS_PER_CALL + "\n"
    pieces = list(_pieces(text))
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= _CHARS_PER_CALL + _LONGEST_RUN
    assert all(len(run) <= _LONGEST_RUN for piece in pieces for run in piece.split())
    ordinary = "a line of words\n" * 5000  # an ordinary text: 2000 lines a call, as before
    assert [len(p) for p in _pieces(ordinary)] == [32000, 32000, 16000]


def test_an_empty_model_onnx_in_an_output_is_a_message(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0
    (in_tmp / "out" / "model.onnx").write_bytes(b"")
    for command in (("run", "out", "--prompt", "hi"), ("eval", "out")):
        result = run_cli(*command)
        assert result.code == 1, command
        assert "model.onnx' is damaged (it holds no graph)" in result.err
        assert "internal error" not in result.err


def test_an_output_inside_the_built_in_models_cache_is_refused(in_tmp, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(in_tmp / "cache"))
    target = in_tmp / "cache" / "models" / "smollm2-135m" / "out"
    recipe = write(in_tmp / "r.surg", 'model "smollm2-135m"\ndrop attention layers 3\n')
    result = run_cli("apply", recipe, "-o", str(target), "--no-verify")
    assert result.code == 1
    assert "lies inside an input" in result.err
    assert not target.exists()
