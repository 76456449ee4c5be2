"""Optional extras (`plot`, `ray`, `genai`): without the package, a message naming the extra, never a traceback.

The test extra installs them, so their absence is simulated: a `None` entry in `sys.modules`
makes `import x` raise ImportError, as on a machine without the package.
"""

from __future__ import annotations

import sys

import pytest

from conftest import run_cli, write


def test_importance_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run_cli("importance", "--model", "tiny-llama", "--metric", "zd", "-o", str(tmp_path / "s.json"),
                     "--plot", str(tmp_path / "s.png"))  # fmt: skip
    assert result.code != 0
    assert "--plot needs matplotlib" in result.err and "surgery[plot]" in result.err
    assert "Traceback" not in result.err
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.png").exists()


def test_search_plot_without_matplotlib_says_why_it_was_not_drawn(tmp_path, monkeypatch):
    from surgery.search.plot import plot_searches

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    why = plot_searches([], str(tmp_path / "search.png"))
    assert why is not None and "surgery[plot]" in why
    assert not (tmp_path / "search.png").exists()


def test_ray_executor_without_ray_names_the_extra(monkeypatch):
    from surgery.search.executors import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(Exception) as raised:
        RayExecutor(1)
    assert "needs Ray" in str(raised.value) and "surgery[ray]" in str(getattr(raised.value, "hint", raised.value))


def test_apply_with_executor_ray_without_ray_is_a_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    recipe = write(
        tmp_path / "r.surg",
        """model "tiny-llama"
drop attention least important by similarity as many as fit {
    size at most 1 GB
}
""",
    )
    result = run_cli("apply", recipe, "-o", str(tmp_path / "out"), "--executor", "ray", "--no-verify")
    assert result.code != 0
    assert "Ray" in result.err and "surgery[ray]" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


def test_a_search_without_matplotlib_says_on_the_console_that_its_plot_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    search = "quantize layers by zd as many as fit {\n most important -> int8\n rest -> int4\n size at most 1 GB\n}\n"
    recipe = write(tmp_path / "r.surg", 'model "tiny-llama"\n' + search)
    result = run_cli("apply", recipe, "-o", str(tmp_path / "out"), "--no-verify")
    assert result.code == 0, result.err
    assert "search.png not drawn: matplotlib is not installed (pip install 'surgery[plot]')" in result.err
    assert not (tmp_path / "out" / "search.png").exists()


def test_a_draft_without_onnxruntime_genai_is_built_and_says_it_was_not_checked(tmp_path, monkeypatch):
    import json

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\ndraft ngram 3\n')
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    draft = json.loads((tmp_path / "out" / "surgery.json").read_text())["draft"]
    assert draft["passed"] is None and "surgery[genai]" in draft["genai"]
    assert "surgery[genai]" in result.out and "Traceback" not in result.err
