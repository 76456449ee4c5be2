"""Golden files: recipe in, rendered diagnostics (or plan) out.

`tests/golden/errors/X.surg` -> `X.err`: what `surgery check X.surg` prints to stderr, and its
exit code. `tests/golden/plans/X.surg` -> `X.plan` (and `X.json` where present): what
`surgery plan` prints. Regenerate with SURGERY_UPDATE_GOLDEN=1 after a deliberate change.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import run_cli

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("SURGERY_UPDATE_GOLDEN") == "1"


def _compare(path: Path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual)
    assert path.exists(), f"missing golden file {path} (run with SURGERY_UPDATE_GOLDEN=1)"
    assert actual == path.read_text()


@pytest.mark.parametrize("recipe", sorted((GOLDEN / "errors").glob("*.surg")), ids=lambda p: p.stem)
def test_diagnostics(recipe: Path, monkeypatch):
    monkeypatch.chdir(recipe.parent)
    result = run_cli("check", recipe.name)
    _compare(recipe.with_suffix(".err"), f"{result.err}exit: {result.code}\n")


@pytest.mark.parametrize("recipe", sorted((GOLDEN / "plans").glob("*.surg")), ids=lambda p: p.stem)
def test_plans(recipe: Path, monkeypatch):
    monkeypatch.chdir(recipe.parent)
    result = run_cli("plan", recipe.name)
    assert result.code == 0, result.err
    progress = re.compile(r"^\[\s*[0-9.]+s\] .*\n", re.MULTILINE)  # timed phase lines vary run to run
    _compare(recipe.with_suffix(".plan"), progress.sub("", result.err) + result.out)
    as_json = run_cli("plan", recipe.name, "--json")
    _compare(recipe.with_suffix(".json"), json.dumps(json.loads(as_json.out), indent=2) + "\n")
