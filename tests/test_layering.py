"""The package's layers: no import cycles, and no module imports a layer above it.

Every import counts, at module level, inside functions and under TYPE_CHECKING alike: a cycle
through a lazy import is still two modules that cannot be understood apart.
"""

from __future__ import annotations

import ast

import networkx as nx

from conftest import REPO

ROOTS = {"surgery": REPO / "surgery", "surgery.passes": REPO / "passes", "surgery.grammar": REPO / "grammar"}


def _modules() -> dict[str, tuple[ast.Module, bool]]:
    """Every module by dotted name: its syntax tree, and whether it is a package's __init__."""
    found = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([package, *parts])] = (ast.parse(path.read_text(encoding="utf-8")), is_package)
    return found


def _imports() -> nx.DiGraph:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, (tree, is_package) in modules.items():
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                target = resolve(name)
                # A module importing its own package's __init__ is not a dependency on a layer.
                if target and target != module and not module.startswith(target + "."):
                    graph.add_edge(module, target)
    return graph


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_imports()) if len(c) > 1]
    assert cycles == []


def _under(module: str, *prefixes: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _importers(graph: nx.DiGraph, prefix: str) -> set[str]:
    return {a for a, b in graph.edges if _under(b, prefix) and not _under(a, prefix)}


def test_the_pipeline_and_the_search_sit_on_top():
    graph = _imports()
    # Its two faces use it: the commands and the Python API (nothing imports either of them).
    assert all(_under(module, "surgery.cli", "surgery.api") for module in _importers(graph, "surgery.pipeline"))
    assert not [m for m in _importers(graph, "surgery.api") if m != "surgery"]  # the package's lazy __getattr__
    # The search is handed what it needs by the pipeline (which builds its candidates).
    assert all(_under(module, "surgery.cli", "surgery.pipeline") for module in _importers(graph, "surgery.search"))


def test_the_executor_knows_no_statement_and_the_plan_no_executor():
    graph = _imports()
    executor = {m for m in graph if m.startswith("surgery.executor")}
    above = ("surgery.front.statements", "surgery.front.planner", "surgery.front.check", "surgery.front.parser",
             "surgery.front.syntax")  # fmt: skip
    for module in executor:
        assert not [t for t in graph.successors(module) if _under(t, *above)], module
    for module in ("surgery.front.plan", "surgery.front.plan_step", "surgery.front.checked", "surgery.front.recipe"):
        assert not [t for t in graph.successors(module) if _under(t, "surgery.executor", "surgery.front.statements")]


def test_the_middle_the_ir_and_model_io_know_no_front_end():
    """Passes, analyses, the IR, the exporter, the back end, the records and model IO are below
    the language: none of them imports the front end (surgery.front). The report is the one
    exception: it records the plan that ran (plain data)."""
    graph = _imports()
    below = ("surgery.passes", "surgery.analysis", "surgery.importance", "surgery.models", "surgery.ir",
             "surgery.nodes", "surgery.architectures", "surgery.export", "surgery.backend",
             "surgery.formats")  # fmt: skip
    for module in graph:
        if _under(module, *below) and module != "surgery.backend.report":
            assert not [t for t in graph.successors(module) if _under(t, "surgery.front")], module


def test_model_io_knows_no_graph_pass_or_exporter():
    """Model IO (surgery.models: specs, configs, checkpoints, lazy weights) sits under the IR: it
    imports neither the decoder graph nor a pass, the exporter or the executor."""
    graph = _imports()
    above = ("surgery.ir", "surgery.passes", "surgery.export", "surgery.executor", "surgery.analysis")
    for module in graph:
        if _under(module, "surgery.models"):
            assert not [t for t in graph.successors(module) if _under(t, *above)], module


def test_records_and_the_index_import_nothing_heavy():
    """What `check` reads loads without torch, transformers or onnx."""
    import subprocess
    import sys

    code = (
        "import sys, surgery.front.check, surgery.formats.precision, surgery.models.index_cache, surgery.front.planner;"
        "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


def test_the_shipped_built_in_indices_are_what_the_configs_give():
    """builtin_indices.json (read by `check` instead of transformers) is not stale: regenerate it
    with `python -m surgery.models.index_cache` after changing a built-in config or index.py."""
    import json

    from surgery.models.index_cache import BUILTIN_INDICES, builtin_indices

    assert json.loads(BUILTIN_INDICES.read_text()) == json.loads(json.dumps(builtin_indices()))
