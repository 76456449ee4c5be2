"""The importance file: a stable, documented JSON artifact that recipes refer to.

Layout (docs/importance.md is the reference; people may write these by hand):

    {
      "format": "surgery-importance",
      "version": 1,
      "model": {"spec": "smollm2-135m", "architecture": "llama", "layers": 30},   (optional)
      "provenance": {"tool": "surgery 0.2.0", "calibration": {...}},              (optional)
      "metrics": {
        "<metric>": {
          "more_important": "higher" | "lower",
          "parameters": {...},                                                    (optional)
          "scores": {"attention": [...], "mlp": [...], "block": [...]}            (any of the three)
        }
      }
    }

Every score list has one number per original layer (null where the part does not exist).
`load_importance` reports every problem at once, each pointing at its field in the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from surgery.backend.output import write_atomically
from surgery.diagnostics import Diagnostic
from surgery.files import IMPORTANCE_LIMIT, read_source
from surgery.importance.jsonpos import JsonSyntaxError, Path, format_path, parse_with_positions
from surgery.importance.metrics import PARTS, MetricScores
from surgery.source import Source, Span

FORMAT = "surgery-importance"
VERSION = 1


@dataclass(frozen=True)
class ImportanceFile:
    """Scores of one or more metrics for one model, with where they came from."""

    metrics: dict[str, MetricScores]
    model: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON content."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "provenance": self.provenance,
            "metrics": {
                name: {
                    "more_important": scores.more_important,
                    "parameters": scores.parameters,
                    "scores": {part: [_finite_or_none(v) for v in values] for part, values in scores.scores.items()},
                }
                for name, scores in self.metrics.items()
            },
        }


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 8)


def save_importance(importance: ImportanceFile, path: str) -> None:
    """Write the file atomically (temporary file in the same folder, then rename)."""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(importance.to_json(), out, indent=2)
            out.write("\n")

    write_atomically(path, write, ".json")


def is_importance_file(head: bytes) -> bool:
    """Whether the first bytes of a file are those of an importance file (so `-o` may replace it)."""
    return f'"format": "{FORMAT}"'.encode() in head or f'"format":"{FORMAT}"'.encode() in head


class _Validator:
    def __init__(self, source: Source, spans: dict[Path, Span], layers: int | None):
        self.source, self.spans, self.layers = source, spans, layers
        self.diagnostics: list[Diagnostic] = []

    def error(self, path: Path, message: str, hint: str | None = None) -> None:
        span = self.spans.get(path) or self.spans.get(path[:-1]) or self.spans.get(())
        self.diagnostics.append(Diagnostic("error", f"importance file: {format_path(path)}: {message}", span, hint))

    def expect(self, value: Any, kind: type, path: Path, what: str) -> bool:
        if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
            return True
        self.error(path, f"expected {what}, found {_json_kind(value)}")
        return False

    def document(self, data: Any) -> ImportanceFile | None:
        if not self.expect(data, dict, (), "an object"):
            return None
        if data.get("format") != FORMAT:
            self.error(("format",), f'expected "{FORMAT}"', f'add "format": "{FORMAT}", "version": {VERSION}')
        if data.get("version") != VERSION:
            self.error(("version",), f"unsupported version {data.get('version')!r}; this surgery reads version 1")
        model = data.get("model", {})
        if self.expect(model, dict, ("model",), "an object") and "layers" in model:
            stated = model["layers"]
            if self.layers is not None and stated != self.layers:
                self.error(
                    ("model", "layers"),
                    f"the file is for a model with {stated} layers; this model has {self.layers}",
                    "importance scores are per original layer; compute them for this model",
                )
        provenance = data.get("provenance", {})
        self.expect(provenance, dict, ("provenance",), "an object")
        metrics = data.get("metrics")
        if metrics is None:
            self.error((), 'missing "metrics"', 'add "metrics": {"<name>": {"more_important": ..., "scores": ...}}')
            return None
        if not self.expect(metrics, dict, ("metrics",), "an object"):
            return None
        if not metrics:
            self.error(("metrics",), "no metrics")
        parsed = {}
        for name, entry in metrics.items():
            scores = self.metric(name, entry, ("metrics", name))
            if scores is not None:
                parsed[name] = scores
        if self.diagnostics:
            return None
        return ImportanceFile(parsed, model if isinstance(model, dict) else {}, provenance)

    def metric(self, name: str, entry: Any, path: Path) -> MetricScores | None:
        if not self.expect(entry, dict, path, "an object"):
            return None
        direction = entry.get("more_important")
        if direction not in ("higher", "lower"):
            where = (*path, "more_important") if "more_important" in entry else path
            self.error(where, 'more_important must be "higher" or "lower"', "say which scores mean more important")
        parameters = entry.get("parameters", {})
        self.expect(parameters, dict, (*path, "parameters"), "an object")
        scores = entry.get("scores")
        if not isinstance(scores, dict):
            if scores is None:
                self.error(path, 'missing "scores"', 'add "scores": {"block": [one number per layer]}')
            else:
                self.expect(scores, dict, (*path, "scores"), "an object")
            return None
        if not scores:
            self.error((*path, "scores"), "no parts scored", "score at least one of: " + ", ".join(PARTS))
        parsed: dict[str, tuple[float, ...]] = {}
        for part, values in scores.items():
            values_path = (*path, "scores", part)
            if part not in PARTS:
                self.error(values_path, f"unknown part '{part}'", "parts: " + ", ".join(PARTS))
                continue
            if not self.expect(values, list, values_path, "a list of numbers"):
                continue
            if self.layers is not None and len(values) != self.layers:
                self.error(
                    values_path,
                    f"has {len(values)} scores; the model has {self.layers} layers",
                    f"one score per original layer, 0..{self.layers - 1}",
                )
            numbers = []
            for i, value in enumerate(values):
                if value is None:
                    numbers.append(float("nan"))
                elif isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
                    numbers.append(float(value))
                else:
                    self.error((*values_path, i), f"expected a finite number or null, found {_json_kind(value)}")
            parsed[part] = tuple(numbers)
        if direction not in ("higher", "lower"):
            return None
        return MetricScores(name, direction, parsed, parameters if isinstance(parameters, dict) else {})


def _finite(value: int | float) -> bool:
    """Whether a JSON number is a finite float (a 400-digit integer is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _display_path(path: str) -> str:
    """The path relative to the working directory when it lies below it (shorter messages)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f'the string "{value}"' if len(value) <= 40 else f"a string of {len(value)} characters"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def load_importance(path: str, layers: int | None = None) -> tuple[ImportanceFile | None, list[Diagnostic]]:
    """Read and validate an importance file; diagnostics point into the file itself.

    Raises InputFileError when the path is not a regular file of at most 1 MiB. Only a file
    that says it is an importance file (`"format": "surgery-importance"`) has its lines quoted
    in diagnostics; anything else gets one error with a location, so a mistyped path never
    prints the contents of whatever file it names.
    """
    source = read_source(path, "importance file", IMPORTANCE_LIMIT, name=_display_path(path))
    try:
        data, spans = parse_with_positions(source)
    except JsonSyntaxError as problem:
        return None, [Diagnostic("error", f"importance file: {problem}", problem.span, quote=False)]
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None, [
            Diagnostic(
                "error",
                f'\'{source.name}\' is not an importance file (it has no "format": "{FORMAT}")',
                source.span(0, 0),
                "write one with `surgery importance`; the format is in docs/importance.md",
                quote=False,
            )
        ]
    validator = _Validator(source, spans, layers)
    importance = validator.document(data)
    return importance, validator.diagnostics
