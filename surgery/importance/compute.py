"""Computing importance scores for a model, once per run, with an on-disk cache.

`ScoreRequest` says which metrics are wanted and on which calibration; `compute_importance`
runs one calibration pass for all data-driven metrics together (similarity and lim read the
same residuals) plus the data-free ones. Results are cached under
`$SURGERY_CACHE/importance/`, keyed by everything they depend on (model identity, metric
parameters, calibration spec and the text's hash, surgery's version), so `surgery plan`
followed by `surgery apply` computes them once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from surgery import __version__
from surgery.calibration import CalibrationSpec, calibration_tokens
from surgery.data import resolve_text
from surgery.importance.file import ImportanceFile, load_importance, save_importance
from surgery.importance.measures import iks_scores, lim_scores, residual_statistics, similarity_scores, zd_scores
from surgery.importance.metrics import DEFAULT_ZD_THRESHOLD, METRICS, Direction, MetricScores
from surgery.models.specs import ModelSpec
from surgery.progress import counted

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ScoreRequest:
    """Metrics to compute and the calibration the data-driven ones use."""

    metrics: tuple[str, ...]
    calibration: CalibrationSpec = CalibrationSpec()
    zd_threshold: float = DEFAULT_ZD_THRESHOLD
    zd_more_important: Direction = "lower"
    data_dir: str | None = None  # where relative data paths are resolved (the recipe's folder)

    @property
    def needs_data(self) -> bool:
        """Whether any requested metric reads calibration data."""
        return any(METRICS[m].needs_data for m in self.metrics)


def model_identity(spec: ModelSpec) -> str:
    """A string that changes whenever the model's weights might have."""
    if spec.kind in ("folder", "gguf"):
        path = Path(spec.location)
        files = sorted(path.glob("*.safetensors")) + [path / "config.json"] if path.is_dir() else [path]
        stamps = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]
        return f"{spec.kind}:{spec.location}:" + ",".join(stamps)
    return f"{spec.kind}:{spec.location}"


def _cache_path(spec: ModelSpec, request: ScoreRequest, metric: str, data_sha: str | None) -> Path:
    from surgery.models.builtin import cache_dir

    key = {
        "model": model_identity(spec),
        "metric": metric,
        "version": __version__,
        "zd": [request.zd_threshold, request.zd_more_important] if metric == "zd" else None,
        "calibration": asdict(request.calibration) if METRICS[metric].needs_data else None,
        "data": data_sha if METRICS[metric].needs_data else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "importance" / f"{metric}-{digest}.json"


def cached_importance(spec: ModelSpec, request: ScoreRequest, layers: int) -> ImportanceFile | None:
    """The requested metrics from the cache if every one of them is there, else None."""
    found, provenance, model = _cached_metrics(spec, request, layers)
    if set(found) != set(request.metrics):
        return None
    return ImportanceFile({m: found[m] for m in request.metrics}, model, provenance)


def _cached_metrics(spec: ModelSpec, request: ScoreRequest, layers: int) -> tuple[dict[str, MetricScores], dict, dict]:
    """(the requested metrics the cache holds, their provenance, the model they were scored on)."""
    data_sha = resolve_text(request.calibration.data, request.data_dir).sha256 if request.needs_data else None
    found: dict[str, MetricScores] = {}
    provenance: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for metric in request.metrics:
        path = _cache_path(spec, request, metric, data_sha)
        if not path.exists():
            continue
        importance, problems = load_importance(str(path), layers)
        if importance is None or problems or metric not in importance.metrics:
            continue
        found[metric] = importance.metrics[metric]
        provenance.update(importance.provenance)
        model = importance.model
    return found, provenance, model


def checked_device(name: str | None) -> str | None:
    """The device calibration runs on, refused with a hint when this PyTorch cannot use it."""
    import torch

    if name is None or name == "cpu":
        return None
    if name == "cuda" and not torch.cuda.is_available():
        from surgery.diagnostics import HintedError

        raise HintedError(
            "--device cuda: this PyTorch sees no CUDA device (torch.cuda.is_available() is False)",
            "install a CUDA build of torch on a machine with a GPU, or calibrate on the CPU (the default)",
        )
    return name


def compute_importance(
    graph: Any,
    tokenizer: Any,
    spec: ModelSpec,
    request: ScoreRequest,
    progress: Progress = lambda _: None,
    use_cache: bool = True,
    device: str | None = None,
) -> ImportanceFile:
    """Scores for every requested metric on the (unmodified) graph; reads and fills the cache.

    The calibration passes run on `device` (default the CPU), one layer there at a time.
    """
    index = graph.index
    found, cached_provenance, _ = _cached_metrics(spec, request, index.num_layers) if use_cache else ({}, {}, {})
    if found:
        progress("importance: " + ", ".join(found) + " (cached)")
    missing = [m for m in request.metrics if m not in found]
    metrics, provenance, data_sha = _computed(graph, tokenizer, replace(request, metrics=tuple(missing)), progress,
                                              device) if missing else ({}, {}, None)  # fmt: skip
    model = {"spec": spec.text, "architecture": index.architecture, "layers": index.num_layers}
    if use_cache:
        for metric, scores in metrics.items():  # a pass's every metric, asked for or not
            single = ImportanceFile(
                {metric: scores},
                model,
                provenance
                if METRICS[metric].needs_data
                else {k: v for k, v in provenance.items() if k != "calibration"},
            )
            path = _cache_path(spec, request, metric, data_sha)
            os.makedirs(path.parent, exist_ok=True)
            save_importance(single, str(path))
    ordered = {m: found[m] if m in found else metrics[m] for m in request.metrics}
    return ImportanceFile(ordered, model, {**cached_provenance, **provenance})


def _computed(graph: Any, tokenizer: Any, request: ScoreRequest, progress: Progress,
              device: str | None) -> tuple[dict[str, MetricScores], dict[str, Any], str | None]:  # fmt: skip
    """(scores, provenance, the calibration text's digest) of the request's metrics, computed.
    A pass that gives more metrics than asked (similarity and lim come from one) gives them all,
    so the cache holds them for the next command."""
    metrics: dict[str, MetricScores] = {}
    provenance: dict[str, Any] = {"tool": f"surgery {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    data_sha = None
    data_metrics = [m for m in request.metrics if METRICS[m].needs_data]
    if data_metrics:
        calibration = request.calibration
        source = resolve_text(calibration.data, request.data_dir)
        data_sha = source.sha256
        tokens = calibration_tokens(tokenizer, calibration, source)
        start = time.perf_counter()
        on = f"on {calibration.describe()} ({tokens.size} tokens)"
        layers = len(graph.layers)
        if any(m in ("similarity", "lim") for m in data_metrics):  # one layer-major pass gives both
            with counted(progress, f"importance: similarity, lim {on}", layers, "layer"):
                statistics = residual_statistics(graph, tokens, device=device)
            metrics["similarity"] = similarity_scores(statistics)
            metrics["lim"] = lim_scores(statistics)
        if "iks" in data_metrics:
            with counted(progress, f"importance: iks {on}", layers, "layer"):
                metrics["iks"] = iks_scores(graph, tokens, device=device)
        provenance["calibration"] = {
            **source.to_json(),
            "samples": calibration.samples,
            "length": calibration.length,
            "seed": calibration.seed,
            "tokens": int(tokens.size),
            "seconds": round(time.perf_counter() - start, 2),
        }
    if "zd" in request.metrics:
        with counted(progress, f"importance: zd (threshold {request.zd_threshold:g}, data-free)",
                     len(graph.layers), "layer"):  # fmt: skip
            metrics["zd"] = zd_scores(graph, request.zd_threshold, request.zd_more_important)
    return metrics, provenance, data_sha
