"""Semantic check of a parsed recipe against the model index (config only, no weights).

Resolves every selector to original layer numbers and reports, all at once: layers out of
range, reversed or empty ranges, dropping every attention layer, bad model specs, unsupported
architectures, bad export options; overlapping or duplicate selections are warnings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from surgery.diagnostics import Diagnostic, RecipeError, raise_if_errors
from surgery.export.options import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportOptions
from surgery.layers import evenly_spaced, format_layers
from surgery.models.index import SUPPORTED_ARCHITECTURES, ModelIndex
from surgery.models.loading import ModelSpec, ModelSpecError, load_config, resolve_spec
from surgery.source import Span
from surgery.syntax import (
    AllLayers,
    DropStmt,
    EvenlyLayers,
    ExportStmt,
    FirstLayers,
    LastLayers,
    LayerIndex,
    ModelStmt,
    Recipe,
    Selector,
)


@dataclass(frozen=True)
class ResolvedDrop:
    """A drop statement with its selector resolved to sorted original layer numbers."""

    part: str
    layers: tuple[int, ...]
    statement: DropStmt


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


class _Checker:
    def __init__(self, recipe: Recipe, model_override: str | None):
        self.recipe = recipe
        self.model_override = model_override
        self.diagnostics: list[Diagnostic] = []

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
        source = self.recipe.source
        base_dir = os.path.dirname(os.path.abspath(source.name)) if source and source.name != "<string>" else None
        try:
            spec = resolve_spec(text, base_dir)
            config = load_config(spec)
        except ModelSpecError as problem:
            self.error(str(problem), span, problem.hint)
            return None
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            self.error(
                f"cannot compile '{text}': architecture '{config.model_type}' is not supported",
                span,
                "supported architectures: " + ", ".join(sorted(SUPPORTED_ARCHITECTURES)),
            )
            return None
        index = ModelIndex.from_config(text, config)
        for reason in index.unsupported_reasons():
            self.error(f"cannot compile '{text}': {reason}", span)
        return spec, index, span

    # Selectors.

    def selector(self, selector: Selector, index: ModelIndex) -> tuple[int, ...] | None:
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
        duplicates = sorted({layer for layer in chosen if chosen.count(layer) > 1})
        if duplicates:
            self.warning(f"layer(s) {format_layers(duplicates)} selected more than once", selector.span)
        return tuple(sorted(set(chosen))) if ok else None

    def layer_number(self, item: LayerIndex, n: int, hint: str) -> int | None:
        if -n <= item.value < n:
            return item.value % n
        self.error(f"layer {item.value} is out of range", item.span, hint)
        return None

    # Drops.

    def drops(self, index: ModelIndex) -> list[ResolvedDrop]:
        resolved: list[ResolvedDrop] = []
        for statement in self.recipe.statements:
            if isinstance(statement, DropStmt):
                layers = self.selector(statement.selector, index)
                if layers is not None:
                    resolved.append(ResolvedDrop(statement.part, layers, statement))
        self.overlaps(resolved)
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
        return ExportOptions(opset=opset, kv_cache=statement.kv_cache), statement


def check(recipe: Recipe, model_override: str | None = None) -> CheckedRecipe:
    """Check a recipe against its model; raises RecipeError with every error found."""
    checker = _Checker(recipe, model_override)
    model = checker.model()
    export, export_statement = checker.export()
    drops = checker.drops(model[1]) if model is not None else []
    raise_if_errors(checker.diagnostics)
    assert model is not None
    spec, index, model_span = model
    warnings = tuple(d for d in checker.diagnostics if d.severity == "warning")
    return CheckedRecipe(recipe, spec, index, tuple(drops), export, export_statement, warnings, model_span)


__all__ = ["CheckedRecipe", "RecipeError", "ResolvedDrop", "check"]
