"""Semantic check of a parsed recipe against the model index (config only, no weights).

Resolves every layer selector to original layer numbers and checks every importance selector
(amount, metric, importance file) so that only the ranking remains for the plan. Reports, all
at once: layers out of range, reversed or empty ranges, dropping every attention layer, bad
model specs, unsupported architectures, unknown metrics, invalid importance files (pointing
into the file), bad calibration, quantization and export options; overlapping or duplicate
selections are warnings.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace

from surgery import architectures
from surgery.calibration import (
    DEFAULT_LENGTH,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    SHORTAGE_HINT,
    CalibrationSpec,
    count_tokens,
    shortage,
)
from surgery.data import TextSource, TextSourceError, resolve_text, text_file
from surgery.diagnostics import Diagnostic, RecipeError, did_you_mean, raise_if_errors
from surgery.expert_rules import full_rank, merge_problem, merge_rank, prune_problem, rank_problem
from surgery.export.options import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportOptions
from surgery.files import InputFileError, path_exists
from surgery.importance.file import ImportanceFile, load_importance
from surgery.importance.metrics import METRICS
from surgery.layers import evenly_spaced, format_layers
from surgery.models.index import ModelIndex
from surgery.models.loading import ModelSpec, ModelSpecError, load_config, resolve_spec, tokenizer_without_weights
from surgery.selection import ImportanceQuery, ScoreSource
from surgery.source import Span
from surgery.syntax import (
    AllLayers,
    CalibrateStmt,
    DropStmt,
    EvenlyLayers,
    ExportStmt,
    FirstLayers,
    FuseStmt,
    ImportanceRank,
    ImportanceSelector,
    ImportanceSource,
    LastLayers,
    LayerIndex,
    MergeStmt,
    ModelStmt,
    PruneStmt,
    QuantizeGroupStmt,
    QuantizeRule,
    QuantizeStmt,
    Recipe,
    RestLayers,
    Selector,
    SplitStmt,
    VerifyStmt,
)

DEFAULT_QUANT_BLOCK = 32
QUANT_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
DEFAULT_PERPLEXITY_TOKENS = 4096
MIN_PERPLEXITY_TOKENS = 64
DEFAULT_WINDOW = 512  # tokens per perplexity window; less where the model's context is shorter
DEFAULT_FUSE_WEIGHT = 0.02  # chosen by measurement on smollm2-135m: docs/fusion.md
# Which importance scores rank the layers for a statement's part.
SCORE_PART = {"attention": "attention", "mlp": "mlp", "block": "block", "layers": "block"}


@dataclass(frozen=True)
class ResolvedDrop:
    """A drop statement: sorted original layer numbers, or an importance query the plan resolves."""

    part: str
    layers: tuple[int, ...]
    statement: DropStmt
    query: ImportanceQuery | None = None


@dataclass(frozen=True)
class ResolvedQuantize:
    """One quantize statement, or one rule of a grouped quantize, checked.

    Exactly one of: `layers` (explicit), `query` (by importance), `rest` (the group's
    leftovers); the head has none of them.
    """

    part: str  # "layers", "attention", "mlp" or "head"
    bits: int
    block: int
    symmetric: bool
    span: Span | None
    layers: tuple[int, ...] = ()
    query: ImportanceQuery | None = None
    rest: bool = False
    group: int | None = None  # rules of one grouped statement share a number


@dataclass(frozen=True)
class ResolvedSplit:
    """A split statement: explicit layers or an importance query, expert count and top-k."""

    layers: tuple[int, ...]
    experts: int
    top_k: int
    statement: SplitStmt
    query: ImportanceQuery | None = None


@dataclass(frozen=True)
class ResolvedPrune:
    """A prune statement: the layers and how many experts each keeps."""

    layers: tuple[int, ...]
    keep: int
    statement: PruneStmt


@dataclass(frozen=True)
class ResolvedMerge:
    """A merge statement: the layers, how many groups, and how to group and weight."""

    layers: tuple[int, ...]
    groups: int
    grouping: str
    weighting: str
    statement: MergeStmt
    rank: int | None = None  # Sub-MoE truncation: an absolute rank, or
    rank_percent: float | None = None  # a share of an expert's full rank


@dataclass(frozen=True)
class ResolvedFuse:
    """A fuse statement: the layer (static), or the candidates (auto, dynamic), and the weight."""

    mode: str  # "static", "auto" or "dynamic"
    weight: float
    layer: int | None
    candidates: tuple[int, ...]
    statement: FuseStmt


_TOKEN_COUNTS: dict[tuple[int, str, int], int] = {}


def default_fuse_candidates(layers: int) -> tuple[int, ...]:
    """Even layers of the latter half, never the last (fusing the last layer changes nothing)."""
    return tuple(layer for layer in range(layers // 2, layers - 1) if layer % 2 == 0)


@dataclass(frozen=True)
class PerplexityCheck:
    """`verify perplexity on <text> max-increase P% [tokens N]`."""

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
    drops: tuple[ResolvedDrop, ...]
    export: ExportOptions
    export_statement: ExportStmt | None
    warnings: tuple[Diagnostic, ...]
    model_span: Span | None = None  # the spec in the recipe; None when it came from --model
    quantize: tuple[ResolvedQuantize, ...] = ()
    calibration: CalibrationSpec = CalibrationSpec()
    calibration_span: Span | None = None
    perplexity: PerplexityCheck | None = None
    importance_files: dict[str, ImportanceFile] | None = None
    base_dir: str | None = None  # where relative data and file paths resolve (the recipe's folder)
    fuse: ResolvedFuse | None = None
    splits: tuple[ResolvedSplit, ...] = ()
    prunes: tuple[ResolvedPrune, ...] = ()
    merges: tuple[ResolvedMerge, ...] = ()

    def input_paths(self) -> list[str]:
        """The files and folders this recipe reads: recipe, model, importance files, texts.

        An output may never replace or lie inside any of them.
        """
        paths = [self.recipe.source.name] if self.recipe.source and self.recipe.source.name != "<string>" else []
        if self.spec.kind in ("folder", "gguf"):
            paths.append(self.spec.location)
        paths.extend(self.importance_files or ())
        texts = [self.calibration.data] + ([self.perplexity.data] if self.perplexity else [])
        paths.extend(path for path in (text_file(name, self.base_dir) for name in texts) if path is not None)
        return paths

    def metrics_to_compute(self) -> tuple[str, ...]:
        """Metrics some selector ranks by that are computed (not read from a file), in a fixed order."""
        queries = [d.query for d in self.drops] + [q.query for q in self.quantize] + [s.query for s in self.splits]
        wanted = {q.source.metric for q in queries if q is not None and q.source.file is None}
        if self.fuse is not None and self.fuse.mode == "auto":
            wanted.add("iks")
        return tuple(m for m in METRICS if m in wanted)


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

    # The model.

    def model(self) -> tuple[ModelSpec, ModelIndex, Span | None] | None:
        statements = self.single(ModelStmt, "model")
        if self.model_override is not None:
            text, span = self.model_override, None
        elif statements:
            text, span = statements[0].spec, statements[0].spec_span
        else:
            self.error("the recipe names no model", None, 'add a line `model "<spec>"` or pass --model SPEC')
            return None
        try:
            spec = resolve_spec(text, self.base_dir)
            config = load_config(spec)
        except ModelSpecError as problem:
            self.error(str(problem), span, problem.hint)
            return None
        if architectures.lookup(config.model_type) is None:
            near = architectures.closest(config.model_type)
            self.error(
                f"cannot compile '{text}': architecture '{config.model_type}' is not supported",
                span,
                (f"did you mean '{near}'? " if near else "")
                + "supported architectures: "
                + ", ".join(sorted(architectures.REGISTRY)),
            )
            return None
        try:
            index = ModelIndex.from_config(text, config)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as problem:
            self.error(f"cannot compile '{text}': its config is incomplete ({type(problem).__name__})", span)
            return None
        for reason in index.unsupported_reasons():
            self.error(f"cannot compile '{text}': {reason}", span)
        if index.implausible_fields():  # the statements cannot be checked against such a model
            return None
        return spec, index, span

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

    # Drops.

    def drops(self, index: ModelIndex) -> list[ResolvedDrop]:
        resolved: list[ResolvedDrop] = []
        for statement in self.recipe.statements:
            if not isinstance(statement, DropStmt):
                continue
            selector = statement.selector
            if isinstance(selector, ImportanceSelector):
                query = self.importance(
                    selector.rank, selector.source, SCORE_PART[statement.part], index, selector.span
                )
                if query is not None:
                    resolved.append(ResolvedDrop(statement.part, (), statement, query))
                continue
            layers = self.selector(selector, index)
            if layers is not None:
                resolved.append(ResolvedDrop(statement.part, layers, statement))
        self.overlaps([drop for drop in resolved if drop.query is None])
        attention_gone: set[int] = set()
        for drop in resolved:
            if drop.part in ("attention", "block"):
                attention_gone |= set(drop.layers)
                if len(attention_gone) == index.num_layers:
                    self.error(
                        f"this drops the attention of every layer ({index.num_layers} of {index.num_layers})",
                        drop.statement.span,
                        "a decoder needs at least one attention layer; keep at least one",
                    )
                    break
        return resolved

    def overlaps(self, resolved: list[ResolvedDrop]) -> None:
        """Warn where a statement drops something an earlier statement already dropped."""
        removed: dict[tuple[str, int], DropStmt] = {}
        for drop in resolved:
            parts = ("attention", "mlp") if drop.part == "block" else (drop.part,)
            keys = [(part, layer) for layer in drop.layers for part in parts]
            clashes = [key for key in keys if key in removed]
            for part in ("attention", "mlp"):
                layers = [layer for p, layer in clashes if p == part]
                if not layers:
                    continue
                lines = sorted({removed[(part, layer)].span.line for layer in layers})
                self.warning(
                    f"overlapping selection: the {part} of layer(s) {format_layers(layers)} is already dropped "
                    f"on line {', '.join(map(str, lines))}",
                    drop.statement.selector.span,
                    "the overlapping part has no further effect",
                )
            for key in keys:
                removed.setdefault(key, drop.statement)

    # Calibration, quantization, perplexity.

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

    def calibration(self, index: ModelIndex) -> tuple[CalibrationSpec, Span | None]:
        statements = self.single(CalibrateStmt, "calibrate")
        if not statements:
            return CalibrationSpec(), None
        statement = statements[0]
        self.text_exists(statement.data, statement.data_span)
        spec = CalibrationSpec(
            data=statement.data,
            samples=statement.samples if statement.samples is not None else DEFAULT_SAMPLES,
            length=statement.length if statement.length is not None else DEFAULT_LENGTH,
            seed=statement.seed if statement.seed is not None else DEFAULT_SEED,
        )
        if spec.samples < 1:
            self.error("calibration needs at least one sample", statement.span)
        if not 2 <= spec.length <= index.max_positions:
            self.error(
                f"calibration length {spec.length} is out of range",
                statement.span,
                f"use 2..{index.max_positions} tokens (the model's context)",
            )
        return spec, statement.span

    def quantize(self, index: ModelIndex) -> list[ResolvedQuantize]:
        resolved: list[ResolvedQuantize] = []
        groups = 0
        for statement in self.recipe.statements:
            if isinstance(statement, QuantizeStmt):
                block = self.block(statement)
                if statement.part == "head":
                    resolved.append(
                        ResolvedQuantize("head", statement.bits, block, statement.symmetric, statement.span)
                    )
                    continue
                if index.is_moe and statement.part in ("layers", "mlp"):
                    self.error(
                        "quantizing mixture-of-experts MLPs is not supported yet",
                        statement.span,
                        "quantize attention or head on this model",
                    )
                    continue
                selector = statement.selector or AllLayers(span=statement.span)
                item = ResolvedQuantize(statement.part, statement.bits, block, statement.symmetric, statement.span)
                if isinstance(selector, ImportanceSelector):
                    query = self.importance(
                        selector.rank, selector.source, SCORE_PART[statement.part], index, selector.span
                    )
                    if query is not None:
                        resolved.append(replace(item, query=query))
                else:
                    layers = self.selector(selector, index)
                    if layers is not None:
                        resolved.append(replace(item, layers=layers))
            elif isinstance(statement, QuantizeGroupStmt):
                resolved.extend(self.quantize_group(statement, groups, index))
                groups += 1
        return resolved

    def quantize_group(self, statement: QuantizeGroupStmt, group: int, index: ModelIndex) -> list[ResolvedQuantize]:
        if index.is_moe and statement.part in ("layers", "mlp"):
            self.error(
                "quantizing mixture-of-experts MLPs is not supported yet",
                statement.span,
                "quantize attention or head on this model",
            )
            return []
        if not statement.rules:
            self.error(
                "a grouped quantize needs at least one rule", statement.span, "e.g. `most important 25% -> int8`"
            )
            return []
        resolved = []
        part = SCORE_PART[statement.part]
        for position, rule in enumerate(statement.rules):
            if isinstance(rule.selector, RestLayers) and position != len(statement.rules) - 1:
                self.error(
                    "`rest` must be the last rule",
                    rule.span,
                    "rules after `rest` can never match: every layer is taken by then",
                )
                continue
            item = ResolvedQuantize(statement.part, rule.bits, self.block(rule), rule.symmetric, rule.span, group=group)
            if isinstance(rule.selector, RestLayers):
                resolved.append(replace(item, rest=True))
            elif isinstance(rule.selector, ImportanceRank):
                query = self.importance(rule.selector, statement.source, part, index, rule.selector.span)
                if query is not None:
                    resolved.append(replace(item, query=query))
            else:
                layers = self.selector(rule.selector, index)
                if layers is not None:
                    resolved.append(replace(item, layers=layers))
        # The group's source must be valid even if no rule ranks by it.
        if not any(isinstance(rule.selector, ImportanceRank) for rule in statement.rules):
            self.score_source(statement.source, part, index)
        return resolved

    def block(self, item: QuantizeStmt | QuantizeRule) -> int:
        if item.block is None:
            return DEFAULT_QUANT_BLOCK
        if item.block not in QUANT_BLOCKS:
            self.error(
                f"block size {item.block} is not supported",
                item.block_span or item.span,
                "MatMulNBits blocks: " + ", ".join(map(str, QUANT_BLOCKS)) + f" (default {DEFAULT_QUANT_BLOCK})",
            )
        return item.block

    def perplexity(self) -> PerplexityCheck | None:
        statements = self.single(VerifyStmt, "verify")
        if not statements:
            return None
        statement = statements[0]
        self.text_exists(statement.data, statement.data_span)
        tokens = statement.tokens if statement.tokens is not None else DEFAULT_PERPLEXITY_TOKENS
        if tokens < MIN_PERPLEXITY_TOKENS:
            self.error(
                f"{tokens} tokens is too few for a perplexity",
                statement.span,
                f"use at least {MIN_PERPLEXITY_TOKENS} tokens",
            )
        if statement.max_increase <= 0:
            self.error("max-increase must be above 0%", statement.span)
        return PerplexityCheck(statement.data, statement.max_increase, tokens, statement.span)

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

    # Splitting MLPs into experts.

    def splits(self, index: ModelIndex) -> list[ResolvedSplit]:
        resolved = []
        for statement in self.recipe.statements:
            if not isinstance(statement, SplitStmt):
                continue
            if index.is_moe:
                self.error("this model's MLPs are already mixtures of experts", statement.span)
                continue
            if index.mlp_activation != "silu":
                self.error(
                    f"cannot split {index.architecture}'s MLPs: split experts are SwiGLU, this MLP's gate is "
                    f"{index.hidden_act}",
                    statement.span,
                    "splitting works on SwiGLU MLPs (Llama, Mistral, Qwen, Phi-3, Granite, OLMo 2)",
                )
                continue
            ok = True
            if statement.experts < 2 or index.intermediate_size % statement.experts:
                self.error(
                    f"cannot split {index.intermediate_size} MLP neurons into {statement.experts} equal experts",
                    statement.span,
                    "the expert count must be at least 2 and divide the MLP width "
                    f"({', '.join(str(e) for e in range(2, 33) if index.intermediate_size % e == 0)})",
                )
                ok = False
            if not 1 <= statement.top_k <= statement.experts:
                self.error(f"top {statement.top_k} is not in 1..{statement.experts}", statement.span)
                ok = False
            selector = statement.selector
            if isinstance(selector, ImportanceSelector):
                query = self.importance(selector.rank, selector.source, "mlp", index, selector.span)
                if query is not None and ok:
                    resolved.append(ResolvedSplit((), statement.experts, statement.top_k, statement, query))
                continue
            layers = self.selector(selector, index)
            if layers is not None and ok:
                resolved.append(ResolvedSplit(layers, statement.experts, statement.top_k, statement))
        return resolved

    def expert_total(self, statement: PruneStmt | MergeStmt, verb: str, index: ModelIndex, splits) -> int | None:
        """How many experts a prune or merge statement acts on; None (with an error) when it cannot act."""
        if isinstance(statement.selector, ImportanceSelector):
            self.error(f"{verb} experts takes layer numbers", statement.selector.span, "e.g. `layers *`")
            return None
        available = index.num_experts or max((s.experts for s in splits), default=0)
        if not available:
            self.error(
                f"this model has no experts to {verb}",
                statement.span,
                f"{verb} a mixture-of-experts model, or `split mlp ... into E experts` first",
            )
            return None
        return available

    def prunes(self, index: ModelIndex, splits: list[ResolvedSplit]) -> list[ResolvedPrune]:
        resolved = []
        for statement in self.recipe.statements:
            if not isinstance(statement, PruneStmt):
                continue
            available = self.expert_total(statement, "prune", index, splits)
            if available is None:
                continue
            problem = prune_problem(available, statement.keep)
            if problem:
                self.error(problem, statement.span, f"keep 1..{available - 1}")
                continue
            layers = self.selector(statement.selector, index)
            if layers is not None:
                resolved.append(ResolvedPrune(layers, statement.keep, statement))
        return resolved

    def merges(self, index: ModelIndex, splits: list[ResolvedSplit]) -> list[ResolvedMerge]:
        resolved = []
        for statement in self.recipe.statements:
            if not isinstance(statement, MergeStmt):
                continue
            available = self.expert_total(statement, "merge", index, splits)
            if available is None:
                continue
            problem = merge_problem(available, statement.groups)
            if problem:
                self.error(problem, statement.span, f"use 1..{available}")
                continue
            if statement.rank is not None and statement.rank < 1:
                self.error("rank 0 keeps nothing", statement.rank_span, "use a rank of at least 1, or a percentage")
                continue
            if statement.rank_percent is not None and not 0 < statement.rank_percent < 100:
                self.error(
                    f"rank {statement.rank_percent:g}% is not a truncation",
                    statement.rank_span,
                    "use a share of the full rank in (0%, 100%); leave `rank` out to keep it",
                )
                continue
            layers = self.selector(statement.selector, index)
            if layers is not None:
                resolved.append(
                    ResolvedMerge(
                        layers,
                        statement.groups,
                        statement.grouping,
                        statement.weighting,
                        statement,
                        statement.rank,
                        statement.rank_percent,
                    )
                )
        return resolved

    def expert_layers(
        self, index: ModelIndex, splits: list[ResolvedSplit], prunes: list[ResolvedPrune], merges: list[ResolvedMerge]
    ) -> None:
        """Per layer, what the prunes and merges find there (see `expert_layer_problems`).

        Layers that a split chooses by importance are decided by the plan, with the same rules.
        """
        if index.is_moe:
            split_layers: dict[int, int] = {}
        else:
            split_layers = {}
            for split in splits:
                for layer in split.layers:
                    if layer in split_layers:
                        self.error(f"layer {layer} is split twice", split.statement.span, "split each MLP once")
                    split_layers[layer] = split.experts
        undecided = any(split.query is not None for split in splits)
        self.diagnostics.extend(expert_layer_problems(index, split_layers, prunes, merges, undecided))

    # Layer fusion.

    def fuse(self, index: ModelIndex, drops: list[ResolvedDrop]) -> ResolvedFuse | None:
        statements = self.single(FuseStmt, "fuse")
        if not statements:
            return None
        statement = statements[0]
        if index.final_logit_softcap is not None:
            self.error(
                f"cannot fuse layers into {index.architecture}'s head: its logits are soft-capped "
                f"(final_logit_softcapping {index.final_logit_softcap:g}), so readouts do not mix linearly",
                statement.span,
            )
            return None
        n = index.num_layers
        hint = f"model has {n} layers; valid indices 0..{n - 1} (or -{n}..-1 counting from the end)"
        weight = statement.weight if statement.weight is not None else DEFAULT_FUSE_WEIGHT
        ok = True
        if not 0 <= weight <= 1:
            self.error(
                f"weight {weight:g} is not in 0..1", statement.weight_span, "0 = the unfused model, 1 = layer only"
            )
            ok = False
        # Drops by explicit layer numbers are known now; drops by importance are checked by the plan.
        dropped = {layer for d in drops if d.part == "block" and d.query is None for layer in d.layers}
        layer = None
        candidates: tuple[int, ...] = ()
        if statement.mode == "static":
            layer = self.layer_number(statement.layer, n, hint)
            if layer is None:
                return None
            if layer == n - 1:
                self.error(
                    f"layer {statement.layer.value} is the last layer: fusing it into the head changes nothing",
                    statement.layer.span,
                    f"fuse an intermediate layer, e.g. one of {format_layers(default_fuse_candidates(n))}",
                )
                ok = False
            elif layer in dropped:
                self.error(
                    f"layer {layer} cannot be fused: its block is dropped",
                    statement.layer.span,
                    "layer numbers are the original model's; fuse a layer that is kept",
                )
                ok = False
        elif statement.candidates is not None:
            item = statement.candidates
            start, end = self.layer_number(item.start, n, hint), self.layer_number(item.end, n, hint)
            if start is None or end is None:
                return None
            if start > end:
                self.error(f"reversed range {item.start.value}..{item.end.value}", item.span, "write low..high")
                return None
            if end == n - 1:
                self.error("the candidates include the last layer, which cannot be fused", item.span, f"end at {n - 2}")
                return None
            candidates = tuple(range(start, end + 1))
        else:
            candidates = default_fuse_candidates(n)
        if statement.mode != "static" and not [c for c in candidates if c not in dropped]:
            self.error("every candidate layer is dropped", statement.span, "give candidates that are kept")
            ok = False
        return ResolvedFuse(statement.mode, weight, layer, candidates, statement) if ok else None

    # Export.

    def export(self) -> tuple[ExportOptions, ExportStmt | None]:
        statements = self.single(ExportStmt, "export")
        if not statements:
            return ExportOptions(), None
        statement = statements[0]
        opset = statement.opset if statement.opset is not None else DEFAULT_OPSET
        if opset not in SUPPORTED_OPSETS:
            self.error(
                f"opset {opset} is not supported",
                statement.opset_span or statement.span,
                f"supported opsets: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})",
            )
        return ExportOptions(opset=opset, kv_cache=statement.kv_cache, position_ids=statement.position_ids), statement


def expert_layer_problems(
    index: ModelIndex,
    split_layers: dict[int, int],
    prunes: tuple[ResolvedPrune, ...] | list[ResolvedPrune],
    merges: tuple[ResolvedMerge, ...] | list[ResolvedMerge],
    undecided: bool = False,
) -> list[Diagnostic]:
    """Errors for prunes and merges that a layer's experts cannot take.

    `split_layers` maps each layer split into experts to its expert count (ignored for a MoE
    model, whose every layer has the config's experts). Each layer is followed through the
    prunes (which run first) and the merges: a layer without experts, a count to keep or merge
    to that the layer does not have, a rank its experts cannot have. With `undecided` (splits
    chosen by importance are not resolved yet), layers without experts are not reported.
    """
    if index.is_moe:
        layout = {layer: (index.num_experts, index.expert_intermediate_size) for layer in range(index.num_layers)}
    else:
        layout = {layer: (n, index.intermediate_size // n) for layer, n in split_layers.items()}
    problems: list[Diagnostic] = []
    pruned_by: dict[int, Span] = {}
    merged_by: dict[int, Span] = {}
    for resolved in [*prunes, *merges]:
        statement, layers = resolved.statement, resolved.layers
        pruning = isinstance(resolved, ResolvedPrune)
        missing = [layer for layer in layers if layer not in layout]
        if missing and not undecided:
            problems.append(
                Diagnostic(
                    "error",
                    f"layer(s) {format_layers(missing)} have no experts to {'prune' if pruning else 'merge'}",
                    statement.selector.span,
                    "split those MLPs into experts first (`split mlp layers ... into E experts top K`)",
                )
            )
        if not pruning:
            twice = [layer for layer in layers if layer in merged_by]
            if twice:
                first = merged_by[twice[0]]
                problems.append(
                    Diagnostic(
                        "error",
                        f"layer(s) {format_layers(twice)} are merged twice",
                        statement.selector.span,
                        f"already merged at {first.location()}; merge each layer's experts once",
                    )
                )
            for layer in layers:
                merged_by.setdefault(layer, statement.span)
        found: dict[tuple[str, Span | None, str | None], list[int]] = {}
        for layer in layers:
            if layer not in layout or (not pruning and merged_by[layer] is not statement.span):
                continue
            experts, width = layout[layer]
            hint = None
            if pruning:
                problem, span = prune_problem(experts, resolved.keep), statement.span
            elif layer in pruned_by and resolved.groups > experts:
                problem = f"cannot merge into {resolved.groups} groups the {experts} experts that pruning keeps"
                span = statement.span
                hint = f"pruned first (at {pruned_by[layer].location()}); merge to at most {experts}"
            else:
                problem, span = merge_problem(experts, resolved.groups), statement.span
                if problem is None and (resolved.rank is not None or resolved.rank_percent is not None):
                    full = full_rank(index.hidden_size, width)
                    problem = rank_problem(full, merge_rank(full, resolved.rank, resolved.rank_percent))
                    span = statement.rank_span or statement.span
            if problem:
                found.setdefault((problem, span, hint), []).append(layer)
        for (problem, span, hint), where in found.items():
            if hint:  # the layers lead the hint: the message is the same for every layer
                problems.append(Diagnostic("error", problem, span, f"layer(s) {format_layers(where)} are {hint}"))
            else:
                problems.append(Diagnostic("error", f"{problem} (layer(s) {format_layers(where)})", span))
        if pruning:
            for layer in layers:
                if layer in layout:
                    layout[layer] = (resolved.keep, layout[layer][1])
                    pruned_by[layer] = statement.span
    return problems


def check_command_inputs(model: str, calibration: CalibrationSpec | None) -> tuple[ModelSpec, ModelIndex]:
    """The model and calibration of a command without a recipe (`surgery importance`), checked by
    the rules a recipe's are. Raises RecipeError (diagnostics without a place)."""
    recipe = Recipe(statements=(), source=None)
    checker = _Checker(recipe, model)
    found = checker.model()
    if found is not None and calibration is not None:
        spec, index, _ = found
        if checker.text_exists(calibration.data, None):
            checked = CheckedRecipe(recipe, spec, index, (), ExportOptions(), None, (), calibration=calibration)
            checker.calibration_fits(checked, what=f"calibration ({calibration.describe()})")
    raise_if_errors(checker.diagnostics)
    assert found is not None
    return found[0], found[1]


def check(recipe: Recipe, model_override: str | None = None) -> CheckedRecipe:
    """Check a recipe against its model; raises RecipeError with every error found."""
    checker = _Checker(recipe, model_override)
    model = checker.model()
    export, export_statement = checker.export()
    perplexity = checker.perplexity()
    drops: list[ResolvedDrop] = []
    quantize: list[ResolvedQuantize] = []
    calibration, calibration_span = CalibrationSpec(), None
    fuse = None
    splits: list[ResolvedSplit] = []
    prunes: list[ResolvedPrune] = []
    merges: list[ResolvedMerge] = []
    if model is not None:
        index = model[1]
        calibration, calibration_span = checker.calibration(index)
        drops = checker.drops(index)
        quantize = checker.quantize(index)
        fuse = checker.fuse(index, drops)
        splits = checker.splits(index)
        prunes = checker.prunes(index, splits)
        merges = checker.merges(index, splits)
        checker.expert_layers(index, splits, prunes, merges)
        if splits and any(q.part in ("layers", "mlp") for q in quantize):
            checker.error(
                "quantizing MLPs that are split into experts is not supported yet",
                next(q.span for q in quantize if q.part in ("layers", "mlp")),
                "quantize attention or head in a recipe that splits MLPs",
            )
    if model is None:
        raise_if_errors(checker.diagnostics)
    assert model is not None
    spec, index, model_span = model
    if perplexity is not None:
        perplexity = replace(perplexity, window=min(DEFAULT_WINDOW, index.max_positions))
    files = {path: found for path, found in checker.files.items() if found is not None}
    checked = CheckedRecipe(
        recipe,
        spec,
        index,
        tuple(drops),
        export,
        export_statement,
        (),
        model_span,
        tuple(quantize),
        calibration,
        calibration_span,
        perplexity,
        files,
        checker.base_dir,
        fuse,
        tuple(splits),
        tuple(prunes),
        tuple(merges),
    )
    uses_data = any(METRICS[m].needs_data for m in checked.metrics_to_compute()) or prunes or merges
    clean = not any(d.severity == "error" for d in checker.diagnostics)  # else selectors may be missing
    if calibration_span is not None and not uses_data and clean:
        checker.warning(
            "calibration is not used: no selector ranks by a metric computed from data",
            calibration_span,
            "similarity, lim, iks (fuse layer auto) and prune experts use it; zd and importance files do not",
        )
    if uses_data and clean:
        checker.calibration_fits(checked)
    if perplexity is not None and clean:
        checker.evaluation_fits(checked)
    raise_if_errors(checker.diagnostics)
    warnings = tuple(d for d in checker.diagnostics if d.severity == "warning")
    return replace(checked, warnings=warnings)


__all__ = [
    "CheckedRecipe",
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
