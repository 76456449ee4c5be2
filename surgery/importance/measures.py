"""The importance metrics computed on a decoder graph (their definitions: surgery/importance/metrics.py).

similarity and lim come from one pass over the calibration tokens (`residual_statistics`);
zd reads the weights alone; iks runs the logit lens before and after each MLP.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.importance.metrics import DEFAULT_IKS_TOKENS, DEFAULT_ZD_THRESHOLD, PARTS, Direction, MetricScores
from surgery.ir.graph import DecoderGraph
from surgery.ir.inputs import calibration_batches


@torch.inference_mode()
def residual_statistics(
    graph: DecoderGraph, tokens: np.ndarray, batch_size: int = 8, device: str | None = None
) -> dict[str, np.ndarray]:
    """Mean cos(x, m), cos(m, h), cos(x, h) per layer over all tokens, shape (layers,) each.

    Sums are kept in float64 so the mean does not depend on how tokens are batched. The pass
    runs layer-major (`forward_layerwise`): one layer loaded at a time, whatever the model's size;
    with `device` each layer runs there in turn (sequential onloading).
    """
    n = len(graph.layers)
    sums = {key: np.zeros(n, np.float64) for key in ("attention", "mlp", "block")}
    position = {layer.index: i for i, layer in enumerate(graph.layers)}

    def observe(layer: int, x: torch.Tensor, m: torch.Tensor, h: torch.Tensor) -> None:
        i = position[layer]
        for key, (a, b) in (("attention", (x, m)), ("mlp", (m, h)), ("block", (x, h))):
            sums[key][i] += torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).double().sum().item()

    batches = calibration_batches(tokens, batch_size)
    graph.forward_layerwise(batches, observer=observe, logits=False, device=device)
    count = sum(ids.numel() for ids, _, _ in batches)
    return {key: value / count for key, value in sums.items()}


def similarity_scores(statistics: dict[str, np.ndarray]) -> MetricScores:
    """LLM-Drop similarity from `residual_statistics`."""
    scores = {part: tuple(float(v) for v in statistics[part]) for part in PARTS}
    return MetricScores("similarity", "lower", scores, {})


def lim_scores(statistics: dict[str, np.ndarray]) -> MetricScores:
    """LIM from `residual_statistics` (the block cosine, negated)."""
    return MetricScores("lim", "higher", {"block": tuple(float(-v) for v in statistics["block"])}, {})


def _linear_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The weight matrices of a sub-block: Linear weights, and stacked expert weights of an MoE."""
    return [p for p in module.parameters() if p.dim() >= 2]


def z_fraction(weights: list[torch.Tensor], threshold: float) -> float:
    """Fraction of all the given weights whose z-score (over all of them together) exceeds `threshold`."""
    flat = torch.cat([w.detach().reshape(-1).double() for w in weights])
    z = (flat - flat.mean()) / flat.std(correction=0)
    return float((z > threshold).double().mean())


@torch.inference_mode()
def zd_scores(graph: DecoderGraph, threshold: float = DEFAULT_ZD_THRESHOLD, more_important: Direction = "lower"):
    """ZD of each layer's linear weights: attention (q, k, v, o), MLP, and both together (block)."""
    scores: dict[str, list[float]] = {part: [] for part in PARTS}
    for layer in graph.each_layer_materialized():
        attention = _linear_weights(layer.attention) if layer.attention is not None else []
        mlp = _linear_weights(layer.mlp) if layer.mlp is not None else []
        scores["attention"].append(z_fraction(attention, threshold) if attention else float("nan"))
        scores["mlp"].append(z_fraction(mlp, threshold) if mlp else float("nan"))
        scores["block"].append(z_fraction(attention + mlp, threshold))
    return MetricScores(
        "zd",
        more_important,
        {part: tuple(values) for part, values in scores.items()},
        {"threshold": threshold},
    )


@torch.inference_mode()
def iks_scores(
    graph: DecoderGraph, tokens: np.ndarray, max_tokens: int = DEFAULT_IKS_TOKENS, device: str | None = None
) -> MetricScores:
    """Mean IKS per layer over the first calibration samples, at most `max_tokens` tokens (on `device`)."""
    from surgery.nodes.fusion import iks

    samples = max(1, min(len(tokens), max_tokens // tokens.shape[1]))
    chosen = tokens[:samples, :max_tokens]
    sums = {layer.index: 0.0 for layer in graph.layers}

    def observe(layer: int, x: torch.Tensor, m: torch.Tensor, h: torch.Tensor) -> None:
        sums[layer] += float(iks(graph, m, h).double().sum())

    # The logit lens reads the head at every layer: it stays loaded while the layers stream.
    with graph.materialized(graph.head.final_norm, graph.head, device=device):
        graph.forward_layerwise(calibration_batches(chosen, 1), observer=observe, logits=False, device=device)
    count = chosen.size
    scores = tuple(sums[layer.index] / count for layer in graph.layers)
    return MetricScores("iks", "higher", {"block": scores}, {"tokens": int(count)})
