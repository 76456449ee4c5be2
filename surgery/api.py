"""The Python API: check, plan and apply a recipe from code, as the CLI does.

    import surgery

    checked = surgery.check("examples/drop-attention.surg")      # config only: fast
    plan = surgery.plan("examples/drop-attention.surg")          # the resolved steps
    result = surgery.apply("examples/drop-attention.surg", "out/drop-attention")
    result.report["verdict"]["passed"], result.output

Every function takes the recipe's path (relative paths in the recipe start at its folder) and
raises `RecipeError` for problems with the recipe, its model or its inputs (`.diagnostics`
holds each, with its place in the recipe; `str(error)` renders them as the CLI does),
`OutputError` for an output folder it may not write, and `HintedError` (`.hint`) for the
environment (an unavailable provider, a device). A failed verification or perplexity check is
not an exception: `apply` returns, and the result says so (`passed`, `report["verdict"]`).
`progress`, where taken, is called with each phase line; pass `surgery.progress.ProgressLines()`
for the CLI's lines with counts and estimates on stderr.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.backend.output import OutputError
from surgery.diagnostics import HintedError, RecipeError

if TYPE_CHECKING:
    from surgery.front.checked import CheckedRecipe
    from surgery.front.plan import Plan

__all__ = ["Applied", "HintedError", "OutputError", "RecipeError", "apply", "check", "plan"]

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def check(recipe: str | os.PathLike, model: str | None = None) -> CheckedRecipe:
    """Parse and check a recipe against its model's config (no weights are loaded); `model`
    replaces the recipe's `model` statement. The checked recipe holds the model's index
    (`.index`: layers, heads, vocabulary) and the warnings (`.warnings`)."""
    from surgery.pipeline import check_recipe

    return check_recipe(os.fspath(recipe), model)[1]


def plan(recipe: str | os.PathLike, model: str | None = None, *, verify: bool = True,
         progress: Progress | None = None, device: str | None = None) -> Plan:  # fmt: skip
    """The recipe's plan: its ordered steps with their resolved targets and recipe lines
    (`.steps`, `.render()`, `.to_json()`). Loads the model only when a selector ranks by scores
    not cached yet, or a search or expert statistics need it (on `device`, "cpu" or "cuda")."""
    from surgery.pipeline import compile_recipe, resolve_expert_steps

    say = progress or _quiet
    compiled = compile_recipe(os.fspath(recipe), model, verify=verify, progress=say, device=device)
    return resolve_expert_steps(compiled, say, device).plan


@dataclass(frozen=True)
class Applied:
    """What `apply` wrote: the output folder, its report (surgery.json's content), and whether
    it passed its checks (None when nothing was checked)."""

    output: Path
    report: dict[str, Any]
    passed: bool | None


def apply(recipe: str | os.PathLike, output: str | os.PathLike, *, model: str | None = None, force: bool = False,
          verify: bool = True, threads: int | None = None, provider: str = "cpu", device: str | None = None,
          progress: Progress | None = None) -> Applied:  # fmt: skip
    """Run the recipe and write the output folder (complete or not at all; `force` replaces an
    earlier output of surgery, never anything else). `verify` runs verification against
    PyTorch on `provider` ("cpu" or "cuda"); `device` is where PyTorch computes scores and the
    reference. An output that failed a check is kept, marked as failed (docs/outputs.md)."""
    from surgery.pipeline import apply as apply_recipe

    result = apply_recipe(os.fspath(recipe), os.fspath(output), model=model, force=force, run_verification=verify,
                          threads=threads, progress=progress or _quiet, provider=provider, device=device)  # fmt: skip
    verdict = result.report.get("verdict", {})
    passed = verdict.get("passed") if verdict.get("checked", True) else None
    return Applied(result.output, result.report, passed)
