"""The checker's resolution of selectors: layer sets to original layer numbers, importance
selectors to queries the plan ranks by (amounts, metrics, importance files pointing into the file)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace

from surgery.diagnostics import did_you_mean
from surgery.files import InputFileError, path_exists
from surgery.front.selection import ImportanceQuery, ScoreSource
from surgery.front.syntax import (
    AllLayers,
    EvenlyLayers,
    FirstLayers,
    ImportanceRank,
    ImportanceSource,
    LastLayers,
    LayerIndex,
    Selector,
)
from surgery.importance.file import ImportanceFile, load_importance
from surgery.importance.metrics import METRICS
from surgery.layers import evenly_spaced, format_layers
from surgery.models.index import ModelIndex
from surgery.source import Span


class SelectorChecks:
    """Resolving selectors and importance sources (a part of the checker, surgery/front/check.py)."""

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

    def attention_selector(self, selector: Selector, index: ModelIndex, what: str) -> tuple[int, ...] | None:
        """`selector` resolved, for a statement (`what`) about attention: a layer whose token mixer
        is a short convolution (LFM2) has no attention, heads or KV cache, so selecting one is an error."""
        layers = self.selector(selector, index)
        convs = sorted(set(layers or ()) & set(index.conv_layers))
        if not convs:
            return layers
        self.error(f"layer(s) {format_layers(convs)} mix tokens with a short convolution, not attention: "
                   f"{what} does not apply there", selector.span,
                   f"the layers with attention are {format_layers(index.attention_layers)}")  # fmt: skip
        return None

    def layer_number(self, item: LayerIndex, n: int, hint: str) -> int | None:
        """One layer number in range (negative counts from the end); None, with an error, if not."""
        if -n <= item.value < n:
            return item.value % n
        self.error(f"layer {item.value} is out of range", item.span, hint)
        return None

    def importance(
        self, rank: ImportanceRank, source: ImportanceSource, part: str, index: ModelIndex, span: Span | None
    ) -> ImportanceQuery | None:
        """An importance selector checked into a query the plan resolves (None, with errors)."""
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
        """An importance source checked: a known metric for `part`, or an importance file that has it."""
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
        """An importance file read and checked once per recipe (its problems point into the file)."""
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
