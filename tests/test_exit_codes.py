"""Every command ends in 0, 1 (a message), 2 (usage), 3 (verification) or 4 (a bug, reported as
one line plus a report file), never a traceback; the console shows our output, not the
libraries' warnings."""

from __future__ import annotations

import subprocess
import sys

import surgery.front.planner
import surgery.pipeline
from conftest import run_cli, write
from surgery.cli import main

RECIPE = 'model "tiny-llama"\ndrop attention layers 1\n'


def test_main_returns_the_exit_code_for_help_version_and_usage(capsys):
    assert main(["--help"]) == 0
    assert main(["--version"]) == 0
    assert main(["apply"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["run", "out", "--prompt", "x", "--threads", "0"]) == 2
    assert main(["eval", "out", "--window", "9" * 50]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_internal_error_is_one_line_exit_4_and_a_report(in_tmp, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(in_tmp / "cache"))
    recipe = write(in_tmp / "r.surg", RECIPE)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(surgery.pipeline, "build_plan", broken)
    result = run_cli("plan", recipe)
    assert result.code == 4
    first = result.err.strip().splitlines()[0]
    # The innermost frame of surgery's own code (the broken function here lives in the test).
    assert first.startswith("internal error: this is a bug in surgery: ZeroDivisionError at surgery/pipeline.py:")
    assert first.endswith(" in compile_recipe")
    assert "Traceback" not in result.err
    report = next((in_tmp / "cache" / "reports").glob("surgery-error-*.txt"))
    assert f"full report: {report}" in result.err
    text = report.read_text()
    assert "Traceback" in text and "ZeroDivisionError: a bug" in text and "command: surgery plan" in text


def test_a_failure_inside_the_package_names_our_frame(in_tmp, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(in_tmp / "cache"))
    recipe = write(in_tmp / "r.surg", RECIPE)
    monkeypatch.setattr(surgery.front.planner, "VERIFY_DECODE_STEPS", "eight")  # a type error deep inside
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 4 and "at surgery/" in result.err
    assert not (in_tmp / "out").exists()


def test_user_errors_are_exit_1_with_a_message(in_tmp):
    assert run_cli("check", "nope.surg").code == 1
    assert run_cli("run", "nope", "--prompt", "x").code == 1
    assert run_cli("eval", str(in_tmp)).code == 1
    assert run_cli("importance", "--model", "nope", "--metric", "zd", "-o", "x.json").code == 1


def test_the_console_shows_our_lines_only(in_tmp):
    recipe = write(in_tmp / "r.surg", RECIPE)
    command = [sys.executable, "-m", "surgery", "apply", recipe, "-o", "out"]
    quiet = subprocess.run(command, cwd=in_tmp, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    for line in quiet.stderr.splitlines():
        assert line.startswith("[") and "s] " in line, line  # our timed progress lines only
    assert "deprecated" not in quiet.stderr.lower() and "warning" not in quiet.stderr.lower()
    verbose = subprocess.run([*command[:-2], "-o", "out2", "--verbose"], cwd=in_tmp, capture_output=True, text=True)
    assert verbose.returncode == 0
    # A dependency's Python warning (huggingface_hub's about its progress bars), shown on request.
    assert "UserWarning" in verbose.stderr
