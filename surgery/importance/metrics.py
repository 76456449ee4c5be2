"""The importance metrics: what each one measures, and how it is computed on a decoder graph.

Definitions (docs/importance.md has the long form; notation of ../docs: `x` enters layer l,
`m = x + Attn(Norm1(x))`, `h = m + MLP(Norm2(m))`, `cos` along the hidden dimension per token
in fp32, means over every calibration token):

- `similarity` (LLM-Drop): S_attn = mean cos(x, m), S_mlp = mean cos(m, h), S_block = mean
  cos(x, h). A high S means the sub-block barely changes the residual: lower is more important.
- `lim` (Layer-Wise Quantization): LIM(l) = -mean cos(h_{l-1}, h_l), whole layers only; the
  input of layer l is h_{l-1}, so LIM = -S_block. Higher is more important.
- `iks` (ours, for Layer Fused Decoding; surgery/nodes/fusion.py): JSD between the logit-lens
  distributions of FinalNorm(m) and FinalNorm(h), mean over at most 512 calibration tokens
  (the first samples, whole); higher = the MLP injects more parametric knowledge.
- `zd` (data-free): over the linear weights of a layer (or of its attention / MLP), z = (w -
  mean) / std and ZD = the fraction with z > threshold (default 1). Which direction means
  "more important" is a parameter; the default, fewer large weights = more important, follows
  the paper's abstract.

This module is the metrics' facts (importable without torch: `check` reads them); the
computations on a graph are in surgery/importance/measures.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"]
PARTS = ("attention", "mlp", "block")


@dataclass(frozen=True)
class MetricInfo:
    """What a metric scores, which direction is more important, and whether it needs data."""

    name: str
    parts: tuple[str, ...]
    more_important: Direction
    needs_data: bool
    summary: str


METRICS: dict[str, MetricInfo] = {
    "similarity": MetricInfo(
        "similarity",
        PARTS,
        "lower",
        True,
        "mean cosine between a sub-block's input and output residual (LLM-Drop); high = redundant",
    ),
    "lim": MetricInfo(
        "lim", ("block",), "higher", True, "layer input modification: -mean cos(h_{l-1}, h_l); high = important"
    ),
    "zd": MetricInfo(
        "zd", PARTS, "lower", False, "fraction of a layer's weights with z-score above a threshold (data-free)"
    ),
    "iks": MetricInfo(
        "iks",
        ("block",),
        "higher",
        True,
        "internal knowledge score: JSD of the logit-lens distributions before and after the MLP (LFD, ours)",
    ),
}
DEFAULT_ZD_THRESHOLD = 1.0
DEFAULT_IKS_TOKENS = 512  # each token costs two vocabulary projections per layer


@dataclass(frozen=True)
class MetricScores:
    """One metric's per-layer scores for each part it covers, with its direction."""

    metric: str
    more_important: Direction
    scores: dict[str, tuple[float, ...]]
    parameters: dict[str, object]
