"""The package installs and imports from what pyproject.toml declares, and CI proves it fresh.

A module imported only inside a function (scipy for expert alignment, onnxruntime's quantizer,
which itself imports onnx-ir) escapes a plain `import surgery`, so these tests import every
module the package names anywhere, and map every third-party name to a declared distribution.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import re
import sys

import pytest
import tomllib

from conftest import REPO

PACKAGE_FOLDERS = ("surgery", "passes", "grammar")
# Extras whose imports are guarded where they are used (a message names the extra).
GUARDED_EXTRAS = {"matplotlib": "plot", "ray": "ray", "onnxruntime_genai": "genai"}


def _imported_names() -> dict[str, str]:
    """Every absolute module name the package imports, with where (file:line)."""
    found: dict[str, str] = {}
    for folder in PACKAGE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in project["dependencies"]}


def _package_modules() -> list[str]:
    """Every module of the installed packages, from pyproject's package list and folder mapping."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = tool.get("package-dir", {})
    modules = []
    for package in tool["packages"]:
        folder = REPO / folders.get(package, package.replace(".", "/"))
        modules.append(package)
        # __main__ runs the command line when imported.
        files = [path for path in sorted(folder.glob("*.py")) if path.stem not in ("__init__", "__main__")]
        modules.extend(f"{package}.{path.stem}" for path in files)
    return modules


def test_every_module_of_the_package_imports():
    names = _package_modules()
    assert "surgery.passes.quantize" in names and "surgery.grammar" in names and "surgery.cli" in names
    for name in names:
        importlib.import_module(name)


@pytest.mark.parametrize("module", sorted(_imported_names()), ids=str)
def test_every_module_the_package_names_imports(module):
    top = module.split(".")[0]
    if top in GUARDED_EXTRAS:  # installed with the test extras, but guarded for users without it
        pytest.importorskip(top, reason=f"{top} is in the [{GUARDED_EXTRAS[top]}] extra")
    importlib.import_module(module)


def test_every_third_party_import_is_declared():
    declared = _declared()
    distributions = metadata.packages_distributions()
    undeclared = []
    for module, where in _imported_names().items():
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in ("surgery", "__future__") or top in GUARDED_EXTRAS:
            continue
        names = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
        if not names & declared:
            undeclared.append(f"{module} ({where})")
    assert not undeclared, "imported but not in [project] dependencies: " + ", ".join(undeclared)
    # onnxruntime's MatMulNBits quantizer imports onnx-ir without declaring it.
    assert "onnx-ir" in declared


def test_ci_runs_the_readme_test_line_in_a_fresh_environment():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    line = 'pip install torch==2.13.0 ".[test]" && pytest'
    assert line in ci.splitlines()[-1]
    assert f"```bash\n{line}\n```" in readme
    assert "python3 -m venv" in ci and 'activate"' in ci


def test_every_source_folder_is_a_declared_package():
    """A folder of modules under surgery/ that pyproject does not list would be left out of the wheel."""
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "surgery").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert found <= declared, f"not in pyproject's packages: {sorted(found - declared)}"
