"""Output folders: only ours are replaced, inputs are never touched, one run at a time, and a run
killed at any moment leaves the output absent or complete (the next run cleans up after it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, write
from surgery.backend.output import OutputError, OutputFolder

RECIPE = 'model "tiny-llama"\ndrop attention layers 1..2\nexport onnx\n'
OUTPUT_FILES = {".surgery-output", "surgery.json", "model.onnx", "model.onnx.data", "tokenizer.json", "recipe.surg"}


def _complete(folder: Path) -> bool:
    """An output folder as apply leaves it: marker, report, model and data, tokenizer."""
    if not set(os.listdir(folder)) >= OUTPUT_FILES:
        return False
    json.loads((folder / "surgery.json").read_text())
    return True


def _leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p for p in os.listdir(parent) if p.startswith(f".{name}."))


def test_force_replaces_an_earlier_output_but_never_someone_elses_folder(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    (in_tmp / "photos").mkdir()
    (in_tmp / "photos" / "holiday.jpg").write_text("precious")
    refused = run_cli("apply", recipe, "-o", "photos", "--force", "--no-verify")
    assert refused.code == 1
    assert "was not written by `surgery apply`" in refused.err and "move it away" in refused.err
    assert (in_tmp / "photos" / "holiday.jpg").read_text() == "precious"
    # A folder that only looks like ours (a report, no marker) is not ours either.
    (in_tmp / "photos" / "surgery.json").write_text("{}")
    assert run_cli("apply", recipe, "-o", "photos", "--force", "--no-verify").code == 1
    assert (in_tmp / "photos" / "holiday.jpg").exists()
    # An earlier output is replaced, completely and atomically.
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0
    first = json.loads((in_tmp / "out" / "surgery.json").read_text())["created"]
    assert run_cli("apply", recipe, "-o", "out", "--force", "--no-verify").code == 0
    assert _complete(in_tmp / "out")
    assert json.loads((in_tmp / "out" / "surgery.json").read_text())["created"] >= first
    assert _leftovers(in_tmp) == []


def test_output_may_not_be_inside_or_over_an_input(in_tmp):
    from surgery.models import builtin

    builtin.tiny_model("tiny-llama").save_pretrained(in_tmp / "model")
    builtin.byte_tokenizer().save_pretrained(in_tmp / "model")
    recipe = write(in_tmp / "r.surg", 'model "model"\ndrop attention layers 1\n')
    before = sorted(os.listdir(in_tmp / "model"))
    inside = run_cli("apply", recipe, "-o", "model/out")
    assert inside.code == 1 and "lies inside an input" in inside.err
    over = run_cli("apply", recipe, "-o", "model", "--force")
    assert over.code == 1 and "would replace an input" in over.err
    on_recipe = run_cli("apply", recipe, "-o", "r.surg", "--force")
    assert on_recipe.code == 1
    assert sorted(os.listdir(in_tmp / "model")) == before
    assert (in_tmp / "r.surg").read_text().startswith('model "model"')


def test_output_under_a_file_the_working_folder_or_a_link_is_refused(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    (in_tmp / "notes.txt").write_text("mine")
    under = run_cli("apply", recipe, "-o", "notes.txt/out")
    assert under.code == 1 and "which is a file" in under.err and "Traceback" not in under.err
    assert (in_tmp / "notes.txt").read_text() == "mine"
    assert run_cli("apply", recipe, "-o", ".", "--force").code == 1
    assert run_cli("apply", recipe, "-o", "..", "--force").code == 1
    (in_tmp / "real").mkdir()
    (in_tmp / "link").symlink_to(in_tmp / "real")
    linked = run_cli("apply", recipe, "-o", "link", "--force")
    assert linked.code == 1 and "symbolic link" in linked.err


def test_a_second_run_to_the_same_output_is_refused_while_the_first_holds_it(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    holder = OutputFolder(in_tmp / "out", force=False)
    try:
        second = run_cli("apply", recipe, "-o", "out")
        assert second.code == 1
        assert f"another surgery run (process {os.getpid()}) is writing 'out'" in second.err
        with pytest.raises(OutputError, match="another surgery run"):
            OutputFolder(in_tmp / "out", force=True)
    finally:
        holder.discard()
    assert not (in_tmp / "out").exists() and _leftovers(in_tmp) == []
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0


def _surgery(*argv: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "surgery", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_runs_one_wins_the_other_is_told(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    runs = [_surgery("apply", recipe, "-o", "out", "--no-verify", cwd=in_tmp) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "another surgery run" in loser and "is writing 'out'" in loser
    assert _complete(in_tmp / "out") and _leftovers(in_tmp) == []


# Phases of `surgery apply` as its progress lines name them; the run is killed right after one.
PHASES = ("loading", "exporting", "verifying", "quantizing", "quantize:")


@pytest.mark.parametrize("phase", PHASES)
def test_kill_9_at_any_phase_leaves_the_output_absent_or_complete(in_tmp, phase):
    recipe = write(
        in_tmp / "r.surg", 'model "tiny-llama"\ndrop attention layers 1\nquantize attention layers 2..3 to int4\n'
    )
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0  # an earlier output to replace
    run = _surgery("apply", recipe, "-o", "out", "--force", cwd=in_tmp)
    seen = []
    for line in run.stderr:
        seen.append(line)
        if phase in line:
            break
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    assert any(phase in line for line in seen), seen
    # The earlier output or the new one, complete; never a partial target.
    assert not (in_tmp / "out").exists() or _complete(in_tmp / "out")
    retry = run_cli("apply", recipe, "-o", "out", "--force")
    assert retry.code == 0, retry.err
    assert _complete(in_tmp / "out")
    assert _leftovers(in_tmp) == []


def test_killed_runs_leftovers_are_removed_and_reported(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    run = _surgery("apply", recipe, "-o", "out", cwd=in_tmp)
    deadline = time.monotonic() + 120
    while not _leftovers(in_tmp) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    stale = [p for p in _leftovers(in_tmp) if ".partial-" in p]
    if not stale:
        pytest.skip("the run finished before it could be killed")
    assert not (in_tmp / "out").exists()
    again = run_cli("apply", recipe, "-o", "out")
    assert again.code == 0
    assert "removed 1 unfinished folder(s) of an interrupted earlier run" in again.err
    assert json.loads((in_tmp / "out" / "surgery.json").read_text())["removed_leftovers"] == stale
    assert _leftovers(in_tmp) == [] and _complete(in_tmp / "out")
    # Only ours are removed: a look-alike that is not marked stays.
    (in_tmp / ".out.partial-mine").mkdir()
    (in_tmp / ".out.partial-mine" / "keep.txt").write_text("x")
    assert run_cli("apply", recipe, "-o", "out", "--force", "--no-verify").code == 0
    assert (in_tmp / ".out.partial-mine" / "keep.txt").exists()


@pytest.mark.parametrize("ending", ["commit", "discard"])
def test_the_scratch_folder_beside_the_staging_one_is_gone_when_the_run_ends(in_tmp, ending):
    """Rewritten layers go to a marked scratch folder, never into the output; committing or
    failing removes it, and a run killed before either leaves it to the next run's recovery."""
    from surgery.backend.output import OutputFolder

    folder = OutputFolder(in_tmp / "out", force=False)
    scratch = folder.scratch()
    assert scratch == folder.scratch() and scratch.name.startswith(".out.partial-")
    (scratch / "layer-0-0.safetensors").write_bytes(b"x")
    (folder.path / "model.onnx").write_bytes(b"y")
    getattr(folder, ending)()
    assert not scratch.exists()
    assert sorted(p.name for p in in_tmp.iterdir()) == (["out"] if ending == "commit" else [])
    if ending == "commit":
        assert (
            sorted(p.name for p in (in_tmp / "out").iterdir()) != []
            and not (in_tmp / "out" / "layer-0-0.safetensors").exists()
        )


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run(in_tmp):
    from surgery.backend.output import OutputFolder

    killed = OutputFolder(in_tmp / "out", force=False)
    scratch = killed.scratch()
    (scratch / "layer-0-0.safetensors").write_bytes(b"x")  # not empty: removed as marked ours
    killed.lock.release()  # as if killed: nothing removed
    again = OutputFolder(in_tmp / "out", force=False)
    assert scratch in again.removed_leftovers and not scratch.exists()
    again.discard()


def test_a_folder_being_removed_keeps_its_marker_to_the_end(in_tmp, monkeypatch):
    """Killed while it deletes one of its folders (an old output after the swap, a staging
    folder), a run leaves a folder that still carries the marker, so the next run removes it;
    an unmarked folder that is not empty would be someone else's and stay (the race CI hit)."""
    from surgery.backend.output import MARKER, _remove_marked

    folder = in_tmp / ".out.partial-killed"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"written_by": "surgery"}))
    for name in ("model.onnx", "model.onnx.data", "surgery.json"):
        (folder / name).write_text("x")
    real_unlink, removed = Path.unlink, []

    def killed_after_one(self, *args, **kwargs):
        if removed:
            raise SystemExit("killed")
        removed.append(self.name)
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_after_one)
    with pytest.raises(SystemExit):
        _remove_marked(folder)
    monkeypatch.undo()
    assert removed and removed[0] != MARKER and (folder / MARKER).exists()
    OutputFolder(in_tmp / "out", force=False).discard()  # the next run to that target
    assert not folder.exists()
