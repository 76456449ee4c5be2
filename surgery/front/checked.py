"""A recipe that passed the check: what every later stage reads (the plan, the executor, the search).

The checker (surgery/front/check.py) fills it: the model, the export options, the calibration and the
perplexity check every stage shares, and each statement module's resolved form under the module's
name (`checked.of("drop")`). A new statement therefore adds nothing here. This module imports no
statement module: the statements read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from surgery.calibration import CalibrationSpec
from surgery.data import text_file
from surgery.diagnostics import Diagnostic
from surgery.export.options import ExportOptions
from surgery.front.recipe import Recipe
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.importance.file import ImportanceFile
    from surgery.models.index import ModelIndex
    from surgery.models.specs import ModelSpec

# A perplexity over fewer tokens than this says nothing (shared by `verify perplexity` and the
# quality budgets of `as many as fit`).
MIN_PERPLEXITY_TOKENS = 64
DEFAULT_PERPLEXITY_TOKENS = 4096
DEFAULT_WINDOW = 512  # tokens per perplexity window; less where the model's context is shorter


@dataclass(frozen=True)
class PerplexityCheck:
    """`verify perplexity on <text> max-increase P% [tokens N]`, checked."""

    data: str
    max_increase: float
    tokens: int
    span: Span | None = None
    window: int = DEFAULT_WINDOW  # the model's context where that is shorter


@dataclass(frozen=True)
class CheckedRecipe:
    """A recipe that passed the check: the model, resolved statements and warnings."""

    recipe: Recipe
    spec: ModelSpec
    index: ModelIndex
    export: ExportOptions
    export_statement: Any | None = None  # the `export onnx` node, None when the defaults apply
    warnings: tuple[Diagnostic, ...] = ()
    model_span: Span | None = None  # the spec in the recipe; None when it came from --model
    calibration: CalibrationSpec = CalibrationSpec()
    calibration_span: Span | None = None
    perplexity: PerplexityCheck | None = None
    importance_files: dict[str, ImportanceFile] | None = None
    base_dir: str | None = None  # where relative data and file paths resolve (the recipe's folder)
    # Each statement module's resolved form, by the module's name ("drop", "quantize", ...).
    resolved: Mapping[str, Any] = field(default_factory=dict)
    # The importance metrics some statement ranks by that are computed (not read from a file).
    metrics: tuple[str, ...] = ()

    def of(self, statement: str) -> Any:
        """What the statement module `statement` resolved: a tuple of items for statements that
        may repeat (empty when absent), an item or None for those that may not."""
        return self.resolved.get(statement, ())

    def input_paths(self) -> list[str]:
        """The files and folders this recipe reads: recipe, model (with the cache folders its
        weights come from), importance files, texts.

        An output may never replace or lie inside any of them.
        """
        from surgery.models.specs import model_cache_folders

        paths = [self.recipe.source.name] if self.recipe.source and self.recipe.source.name != "<string>" else []
        if self.spec.kind in ("folder", "gguf"):
            paths.append(self.spec.location)
        paths.extend(model_cache_folders(self.spec))  # a built-in's, a converted GGUF's, the hub's
        paths.extend(self.importance_files or ())
        texts = [self.calibration.data] + ([self.perplexity.data] if self.perplexity else [])
        paths.extend(path for path in (text_file(name, self.base_dir) for name in texts) if path is not None)
        return paths

    def metrics_to_compute(self) -> tuple[str, ...]:
        """Metrics some selector ranks by that are computed (not read from a file), in a fixed order."""
        return self.metrics
