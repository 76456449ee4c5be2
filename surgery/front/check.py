"""Semantic check of a parsed recipe against the model index (config only, no weights).

Resolves every layer selector to original layer numbers and checks every importance selector
(amount, metric, importance file) so that only the ranking remains for the plan. Each
statement's own rules live in its module (surgery/front/statements/); this module holds what they
share (selectors, importance sources, texts, token counts) and the loop over them. Reports, all
at once: layers out of range, reversed or empty ranges, dropping every attention layer, bad
model specs, unsupported architectures, unknown metrics, invalid importance files (pointing
into the file), bad calibration, quantization and export options; overlapping or duplicate
selections are warnings.
"""

from __future__ import annotations

import os
from dataclasses import replace

from surgery.calibration import (
    CalibrationSpec,
)
from surgery.data import TextSource, TextSourceError
from surgery.diagnostics import Diagnostic, RecipeError, raise_if_errors
from surgery.export.options import ExportOptions
from surgery.front.check_selectors import SelectorChecks
from surgery.front.check_texts import TextChecks
from surgery.front.checked import (
    DEFAULT_PERPLEXITY_TOKENS,
    DEFAULT_WINDOW,
    MIN_PERPLEXITY_TOKENS,
    CheckedRecipe,
    PerplexityCheck,
)
from surgery.front.statements import STATEMENTS
from surgery.front.statements import export as export_statement
from surgery.front.statements import model as model_statement
from surgery.front.statements import name as statement_name
from surgery.front.statements import verify as verify_statement
from surgery.front.statements.base import SCORE_PART
from surgery.front.statements.drop import ResolvedDrop
from surgery.front.statements.experts import check_expert_layers, expert_layer_problems
from surgery.front.statements.fuse import DEFAULT_FUSE_WEIGHT, ResolvedFuse, default_fuse_candidates
from surgery.front.statements.merge import ResolvedMerge
from surgery.front.statements.prune import ResolvedPrune
from surgery.front.statements.quantize import ResolvedQuantize
from surgery.front.statements.split import ResolvedSplit
from surgery.front.syntax import (
    Recipe,
)
from surgery.importance.file import ImportanceFile
from surgery.importance.metrics import METRICS
from surgery.models.index import ModelIndex
from surgery.models.specs import ModelSpec
from surgery.source import Span


class _Checker(SelectorChecks, TextChecks):
    """Reports diagnostics and resolves what statements share (selectors: check_selectors.py; texts:
    check_texts.py)."""

    def __init__(self, recipe: Recipe, model_override: str | None):
        self.recipe = recipe
        self.model_override = model_override
        self.diagnostics: list[Diagnostic] = []
        source = recipe.source
        self.base_dir = os.path.dirname(os.path.abspath(source.name)) if source and source.name != "<string>" else None
        self.files: dict[str, ImportanceFile | None] = {}
        self.texts: dict[str, TextSource | TextSourceError] = {}

    def error(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic("error", message, span, hint))

    def warning(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic("warning", message, span, hint))

    def check_recipe(self, recipe: Recipe) -> CheckedRecipe:
        """Check another recipe against the same model (a draft's own); raises RecipeError."""
        return check(recipe, self.model_override)

    def single(self, kind: type, what: str) -> list:
        """The statements of `kind`; every one after the first is an error."""
        statements = [s for s in self.recipe.statements if isinstance(s, kind)]
        for extra in statements[1:]:
            self.error(
                f"a recipe has at most one {what} statement",
                extra.span,
                f"the {what} is already given on line {statements[0].span.line}",
            )
        return statements

    # Selectors.

    # Importance selectors.

    # Texts and token counts (calibration, perplexity).


def check_command_inputs(model: str, calibration: CalibrationSpec | None) -> tuple[ModelSpec, ModelIndex]:
    """The model and calibration of a command without a recipe (`surgery importance`), checked by
    the rules a recipe's are. Raises RecipeError (diagnostics without a place)."""
    recipe = Recipe(statements=(), source=None)
    checker = _Checker(recipe, model)
    found = model_statement.check(checker)
    if found is not None and calibration is not None:
        spec, index, _ = found
        if checker.text_exists(calibration.data, None):
            checked = CheckedRecipe(recipe, spec, index, ExportOptions(), calibration=calibration)
            checker.calibration_fits(checked, what=f"calibration ({calibration.describe()})")
    raise_if_errors(checker.diagnostics)
    assert found is not None
    return found[0], found[1]


# Statements whose resolved form every stage reads: CheckedRecipe names them.
_SHARED = ("calibrate", "export", "verify")


def _metrics_to_compute(resolved: dict) -> tuple[str, ...]:
    """The computed metrics the resolved statements rank by, in a fixed order: each module's
    `metrics(resolved)` where it has one, else the metrics of its items' importance queries."""
    wanted: set[str] = set()
    for module in STATEMENTS:
        value = resolved.get(statement_name(module))
        if value is None:
            continue
        if hasattr(module, "metrics"):
            wanted |= module.metrics(value)
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            query = getattr(item, "query", None)
            if query is not None and query.source.file is None:
                wanted.add(query.source.metric)
    return tuple(m for m in METRICS if m in wanted)


def check(recipe: Recipe, model_override: str | None = None) -> CheckedRecipe:
    """Check a recipe against its model; raises RecipeError with every error found.

    The model statement first (it yields the index), then every statement module in
    `STATEMENTS` order, each handed what the ones before resolved.
    """
    checker = _Checker(recipe, model_override)
    model = model_statement.check(checker)
    index = model[1] if model is not None else None
    done: dict = {}
    for module in STATEMENTS:
        if index is None and module not in (export_statement, verify_statement):
            continue  # without a model only the model-free statements can be checked
        done[statement_name(module)] = module.check(checker, index, done)
    if index is not None:
        check_expert_layers(checker, index, done["split"], done["prune"], done["merge"])
        if done["split"] and any(q.part in ("layers", "mlp") for q in done["quantize"]):
            checker.error(
                "quantizing MLPs that are split into experts is not supported yet",
                next(q.span for q in done["quantize"] if q.part in ("layers", "mlp")),
                "quantize attention or head in a recipe that splits MLPs",
            )
    if model is None:
        raise_if_errors(checker.diagnostics)
    assert model is not None
    spec, index, model_span = model
    calibration, calibration_span = done["calibrate"]
    export, export_stmt = done["export"]
    files = {path: found for path, found in checker.files.items() if found is not None}
    resolved = {name: tuple(value) if isinstance(value, list) else value for name, value in done.items()
                if name not in _SHARED}  # fmt: skip
    checked = CheckedRecipe(
        recipe,
        spec,
        index,
        export,
        export_stmt,
        model_span=model_span,
        calibration=calibration,
        calibration_span=calibration_span,
        perplexity=done["verify"],
        importance_files=files,
        base_dir=checker.base_dir,
        resolved=resolved,
        metrics=_metrics_to_compute(resolved),
    )
    perplexity, prunes, merges = checked.perplexity, checked.of("prune"), checked.of("merge")
    gptq = any(item.gptq for item in checked.of("quantize"))
    # a draft's acceptance is predicted on the calibration text (and its candidates may rank by it)
    drafts = bool(checked.of("draft"))
    kv_cache = bool(checked.of("kv_cache"))  # its scales are calibrated on the calibration text
    uses_data = (any(METRICS[m].needs_data for m in checked.metrics_to_compute()) or prunes or merges or gptq
                 or drafts or kv_cache)  # fmt: skip
    clean = not any(d.severity == "error" for d in checker.diagnostics)  # else selectors may be missing
    if calibration_span is not None and not uses_data and clean:
        checker.warning(
            "calibration is not used: no selector ranks by a metric computed from data",
            calibration_span,
            "similarity, lim, iks (fuse layer auto), prune and merge experts, `gptq`, `draft` and `quantize "
            "kv-cache` use it; zd "
            "and importance files do not",
        )
    if uses_data and clean:
        checker.calibration_fits(checked)
    if perplexity is not None and clean:
        checker.evaluation_fits(checked)
    raise_if_errors(checker.diagnostics)
    warnings = tuple(d for d in checker.diagnostics if d.severity == "warning")
    return replace(checked, warnings=warnings)


__all__ = [
    "DEFAULT_FUSE_WEIGHT",
    "DEFAULT_PERPLEXITY_TOKENS",
    "DEFAULT_WINDOW",
    "MIN_PERPLEXITY_TOKENS",
    "SCORE_PART",
    "CheckedRecipe",
    "default_fuse_candidates",
    "expert_layer_problems",
    "PerplexityCheck",
    "RecipeError",
    "ResolvedDrop",
    "ResolvedFuse",
    "ResolvedMerge",
    "ResolvedPrune",
    "ResolvedQuantize",
    "ResolvedSplit",
    "check",
    "check_command_inputs",
]
