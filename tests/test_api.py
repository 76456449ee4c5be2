"""The Python API (`surgery.check`, `surgery.plan`, `surgery.apply`) does what the CLI does, and
`import surgery` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import surgery
from conftest import REPO, write

RECIPE = 'model "tiny-llama"\ndrop attention layers 1..2\n'


def test_check_plan_and_apply_from_code(tmp_path):
    recipe = write(tmp_path / "r.surg", RECIPE)
    checked = surgery.check(recipe)
    assert checked.index.num_layers == 6 and checked.warnings == ()
    plan = surgery.plan(recipe)
    assert [step.action for step in plan.steps] == ["drop attention", "export onnx", "verify"]
    assert plan.steps[0].targets == ("model.layers.1.self_attn", "model.layers.2.self_attn")
    lines = []
    applied = surgery.apply(recipe, tmp_path / "out", progress=lines.append)
    assert applied.passed is True and applied.output == tmp_path / "out"
    assert json.loads(json.dumps(applied.report)) == json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert any(line.startswith("exporting ONNX") for line in lines)
    unverified = surgery.apply(recipe, tmp_path / "out", force=True, verify=False)
    assert unverified.passed is None


def test_errors_are_typed_exceptions_with_their_diagnostics(tmp_path):
    bad = write(tmp_path / "bad.surg", 'model "tiny-llama"\ndrop attention layers 3..9\n')
    with pytest.raises(surgery.RecipeError) as raised:
        surgery.check(bad)
    (diagnostic,) = raised.value.diagnostics
    assert diagnostic.span.line == 2 and "out of range" in diagnostic.message
    recipe = write(tmp_path / "r.surg", RECIPE)
    with pytest.raises(surgery.OutputError):
        surgery.apply(recipe, tmp_path)  # the folder holding the recipe: an input


def test_importing_surgery_imports_no_torch():
    code = "import sys, surgery; assert callable(surgery.check); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "False"
