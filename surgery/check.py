"""Semantic check of a parsed recipe against the model index (config only, no weights).

Resolves every layer selector to original layer numbers and checks every importance selector
(amount, metric, importance file) so that only the ranking remains for the plan. Each
statement's own rules live in its module (surgery/statements/); this module holds what they
share (selectors, importance sources, texts, token counts) and the loop over them. Reports, all
at once: layers out of range, reversed or empty ranges, dropping every attention layer, bad
model specs, unsupported architectures, unknown metrics, invalid importance files (pointing
into the file), bad calibration, quantization and export options; overlapping or duplicate
selections are warnings.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace

from surgery.calibration import (
    SHORTAGE_HINT,
    CalibrationSpec,
    count_tokens,
    shortage,
)
from surgery.checked import (
    DEFAULT_PERPLEXITY_TOKENS,
    DEFAULT_WINDOW,
    MIN_PERPLEXITY_TOKENS,
    CheckedRecipe,
    PerplexityCheck,
)
from surgery.data import TextSource, TextSourceError, resolve_text
from surgery.diagnostics import Diagnostic, RecipeError, did_you_mean, raise_if_errors
from surgery.export.options import ExportOptions
from surgery.files import InputFileError, path_exists
from surgery.importance.file import ImportanceFile, load_importance
from surgery.importance.metrics import METRICS
from surgery.layers import evenly_spaced, format_layers
from surgery.models.index import ModelIndex
from surgery.models.loading import ModelSpec, tokenizer_without_weights
from surgery.selection import ImportanceQuery, ScoreSource
from surgery.source import Span
from surgery.statements import STATEMENTS
from surgery.statements import export as export_statement
from surgery.statements import model as model_statement
from surgery.statements import name as statement_name
from surgery.statements import verify as verify_statement
from surgery.statements.base import SCORE_PART
from surgery.statements.drop import ResolvedDrop
from surgery.statements.experts import check_expert_layers, expert_layer_problems
from surgery.statements.fuse import DEFAULT_FUSE_WEIGHT, ResolvedFuse, default_fuse_candidates
from surgery.statements.merge import ResolvedMerge
from surgery.statements.prune import ResolvedPrune
from surgery.statements.quantize import DEFAULT_QUANT_BLOCK, QUANT_BLOCKS, ResolvedQuantize
from surgery.statements.split import ResolvedSplit
from surgery.syntax import (
    AllLayers,
    EvenlyLayers,
    FirstLayers,
    ImportanceRank,
    ImportanceSource,
    LastLayers,
    LayerIndex,
    Recipe,
    Selector,
)

_TOKEN_COUNTS: dict[tuple[int, str, int], int] = {}


class _Checker:
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

    def selector(self, selector: Selector, index: ModelIndex) -> tuple[int, ...] | None:
        """Original layer numbers of a layer selector (importance selectors go to `importance`)."""
        n = index.num_layers
        range_hint = f"model has {n} layers; valid indices 0..{n - 1} (or -{n}..-1 counting from the end)"
        if isinstance(selector, AllLayers):
            return tuple(range(n))
        if isinstance(selector, (FirstLayers, LastLayers, EvenlyLayers)):
            word = {FirstLayers: "first", LastLayers: "last", EvenlyLayers: "evenly"}[type(selector)]
            limit = n - 2 if isinstance(selector, EvenlyLayers) else n
            if selector.count == 0:
                self.error(f"`layers {word} 0` selects no layers", selector.span)
                return None
            if selector.count > limit:
                extra = " (evenly never picks the first or last layer)" if word == "evenly" else ""
                self.error(
                    f"`layers {word} {selector.count}` asks for more layers than there are{extra}",
                    selector.span,
                    f"model has {n} layers; at most {limit} here",
                )
                return None
            if isinstance(selector, FirstLayers):
                return tuple(range(selector.count))
            if isinstance(selector, LastLayers):
                return tuple(range(n - selector.count, n))
            return tuple(evenly_spaced(selector.count, n))
        chosen: list[int] = []
        ok = True
        for item in selector.items:
            if isinstance(item, LayerIndex):
                layer = self.layer_number(item, n, range_hint)
                ok &= layer is not None
                if layer is not None:
                    chosen.append(layer)
                continue
            start = self.layer_number(item.start, n, range_hint)
            end = self.layer_number(item.end, n, range_hint)
            if start is None or end is None:
                ok = False
                continue
            if start > end:
                self.error(
                    f"reversed range {item.start.value}..{item.end.value} (layers {start} down to {end})",
                    item.span,
                    f"ranges run from low to high and include both ends: write {item.end.value}..{item.start.value}"
                    if (item.start.value < 0) == (item.end.value < 0)
                    else "ranges run from low to high and include both ends",
                )
                ok = False
                continue
            chosen.extend(range(start, end + 1))
        duplicates = sorted(layer for layer, times in Counter(chosen).items() if times > 1)
        if duplicates:
            self.warning(f"layer(s) {format_layers(duplicates)} selected more than once", selector.span)
        return tuple(sorted(set(chosen))) if ok else None

    def layer_number(self, item: LayerIndex, n: int, hint: str) -> int | None:
        if -n <= item.value < n:
            return item.value % n
        self.error(f"layer {item.value} is out of range", item.span, hint)
        return None

    # Importance selectors.

    def importance(
        self, rank: ImportanceRank, source: ImportanceSource, part: str, index: ModelIndex, span: Span | None
    ) -> ImportanceQuery | None:
        n = index.num_layers
        ok = True
        if rank.count is None and rank.percent is None and rank.fit is None:
            # Only a grouped quantize with `as many as fit` gives a rule no amount (checked there).
            self.error(
                f"`{rank.rank} important` needs an amount",
                rank.span,
                f"e.g. `{rank.rank} important 4` or `{rank.rank} important 25%`, or search for it with "
                "`as many as fit { budgets }`",
            )
            ok = False
        if rank.count is not None and not 1 <= rank.count <= n:
            problem = "selects no layers" if rank.count == 0 else "asks for more layers than there are"
            self.error(
                f"`{rank.rank} important {rank.count}` {problem}", rank.span, f"model has {n} layers; ask for 1..{n}"
            )
            ok = False
        if rank.percent is not None and not 0 < rank.percent <= 100:
            self.error(f"{rank.percent:g}% is not a share of the layers", rank.span, "use a percentage in (0, 100]")
            ok = False
        score_source = self.score_source(source, part, index)
        if not ok or score_source is None:
            return None
        return ImportanceQuery(rank.rank, rank.count, rank.percent, score_source, part, span)

    def score_source(self, source: ImportanceSource, part: str, index: ModelIndex) -> ScoreSource | None:
        if source.file is None:
            metric = source.metric
            if metric not in METRICS:
                self.error(
                    f"unknown importance metric '{metric}'",
                    source.metric_span,
                    did_you_mean(metric, METRICS) or "metrics: " + ", ".join(METRICS) + ', or a file: by "imp.json"',
                )
                return None
            if part not in METRICS[metric].parts:
                self.error(
                    f"{metric} has no {part} scores (it scores: {', '.join(METRICS[metric].parts)})",
                    source.metric_span,
                    "rank attention and MLPs by similarity or zd; lim ranks whole layers (drop block, quantize layers)",
                )
                return None
            return ScoreSource(metric)
        path = (
            source.file
            if os.path.isabs(source.file) or self.base_dir is None
            else os.path.join(self.base_dir, source.file)
        )
        if path not in self.files:
            self.files[path] = self.importance_file(path, source, index)
        importance = self.files[path]
        if importance is None:
            return None
        names = list(importance.metrics)
        metric = source.metric
        if metric is None:
            if len(names) > 1:
                self.error(
                    f"importance file '{source.file}' has several metrics ({', '.join(names)}); say which",
                    source.file_span,
                    f'write: by {names[0]} in "{source.file}"',
                )
                return None
            metric = names[0]
        elif metric not in importance.metrics:
            self.error(
                f"importance file '{source.file}' has no metric '{metric}'",
                source.metric_span,
                did_you_mean(metric, names) or "it has: " + ", ".join(names),
            )
            return None
        if part not in importance.metrics[metric].scores:
            have = ", ".join(importance.metrics[metric].scores)
            self.error(
                f"importance file '{source.file}': {metric} has no {part} scores (it has: {have})",
                source.file_span,
            )
            return None
        return ScoreSource(metric, path, source.file)

    def importance_file(self, path: str, source: ImportanceSource, index: ModelIndex) -> ImportanceFile | None:
        if not path_exists(path):
            self.error(
                f"importance file '{source.file}' not found",
                source.file_span,
                "write one with `surgery importance --metric ... -o FILE`; relative paths start at the recipe's folder",
            )
            return None
        try:
            importance, problems = load_importance(path, index.num_layers)
        except InputFileError as problem:
            self.error(str(problem), source.file_span, problem.hint)
            return None
        where = source.file_span.location() if source.file_span else None
        for problem in problems:
            hint = (problem.hint + "; " if problem.hint else "") + (f"file read for {where}" if where else "")
            self.diagnostics.append(replace(problem, hint=hint or None))
        return importance

    # Texts and token counts (calibration, perplexity).

    def text(self, name: str) -> TextSource | TextSourceError:
        """A named text resolved once per check (resolving reads the whole file to hash and check it)."""
        if name not in self.texts:
            try:
                self.texts[name] = resolve_text(name, self.base_dir)
            except TextSourceError as problem:
                self.texts[name] = problem
        return self.texts[name]

    def text_exists(self, name: str, span: Span | None) -> bool:
        found = self.text(name)
        if isinstance(found, TextSourceError):
            self.error(str(found), span, found.hint)
            return False
        return True

    def tokenizer(self, spec: ModelSpec):
        """The model's tokenizer if it loads without weights (see `tokenizer_without_weights`), once."""
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = tokenizer_without_weights(spec)
        return self._tokenizer

    def tokens_in(self, name: str, spec: ModelSpec, enough: int) -> tuple[int, bool] | None:
        """(tokens, exact) in a text, counted up to `enough`: exactly with the model's tokenizer,
        else an upper bound (no token is shorter than a byte, bar one leading space marker)."""
        source = self.text(name)
        if isinstance(source, TextSourceError):
            return None  # reported where the text is named
        tokenizer = self.tokenizer(spec)
        if tokenizer is None:
            return os.path.getsize(source.path) + 1, False
        # Counted once per tokenizer, text (by content) and bound in a process that checks often.
        key = (id(tokenizer), source.sha256, enough)
        if key not in _TOKEN_COUNTS:
            _TOKEN_COUNTS[key] = count_tokens(tokenizer, source.read(), enough)
        return _TOKEN_COUNTS[key], True

    def calibration_fits(self, checked: CheckedRecipe, what: str | None = None) -> None:
        """The calibration (the statement's, or the defaults) fits the model and its text is long enough."""
        spec, index = checked.calibration, checked.index
        span = checked.calibration_span or checked.model_span
        if what is None:
            what = "calibration" if checked.calibration_span else f"the default calibration ({spec.describe()})"
        if not 2 <= spec.length <= index.max_positions:
            if checked.calibration_span is None:  # a statement's length is checked with the statement
                self.error(
                    f"{what} is longer than the model's context of {index.max_positions} tokens",
                    span,
                    f"ask for samples of at most {index.max_positions} tokens",
                )
            return
        needed = spec.samples * spec.length
        counted = self.tokens_in(spec.data, checked.spec, needed)
        if counted is None:
            return
        tokens, exact = counted
        problem = shortage(spec, tokens)
        if problem:
            if not exact:
                problem = problem.replace(f"has {tokens:,} tokens", f"has at most {tokens:,} tokens")
            self.error(problem, span, SHORTAGE_HINT)

    def evaluation_fits(self, checked: CheckedRecipe) -> None:
        """`verify perplexity`'s text has enough tokens to score."""
        check = checked.perplexity
        counted = self.tokens_in(check.data, checked.spec, MIN_PERPLEXITY_TOKENS)
        if counted is not None and counted[0] < MIN_PERPLEXITY_TOKENS:
            at_most = "" if counted[1] else "at most "
            self.error(
                f"'{check.data}' has {at_most}{counted[0]} tokens, too few for a perplexity",
                check.span,
                f"give a text of at least {MIN_PERPLEXITY_TOKENS} tokens",
            )


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
    uses_data = any(METRICS[m].needs_data for m in checked.metrics_to_compute()) or prunes or merges or gptq
    clean = not any(d.severity == "error" for d in checker.diagnostics)  # else selectors may be missing
    if calibration_span is not None and not uses_data and clean:
        checker.warning(
            "calibration is not used: no selector ranks by a metric computed from data",
            calibration_span,
            "similarity, lim, iks (fuse layer auto), prune and merge experts, and `gptq` use it; zd and "
            "importance files do not",
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
    "DEFAULT_QUANT_BLOCK",
    "DEFAULT_WINDOW",
    "MIN_PERPLEXITY_TOKENS",
    "QUANT_BLOCKS",
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
