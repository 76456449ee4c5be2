"""The KV cache's scales, calibrated on the recipe's calibration text, a layer at a time.

The calibration tokens run through the model layer-major (as GPTQ's walk does): a layer is
loaded, every batch passes through it with its attention observing the keys (after RoPE) and
values it caches, and the layer is released. What is kept per quantized layer is small: the
largest magnitude per channel, and a strided sample of tokens for the clipping search.

Keys rotate with position: a channel pair (i, i + rotary/2) holds (a cos t - b sin t, b cos t +
a sin t) at position t, so a channel reaches the pair's norm sqrt(a^2 + b^2) at some position
even where the calibration text is short. A key channel's threshold is therefore the pair's
norm, its envelope (as onnxruntime-genai's KV calibration does), and its clipping is searched
on the values the pair takes over every angle. Values do not rotate: their threshold is their
largest magnitude.

int8 keeps the whole range (clipping gains nothing at 255 levels). int4 has 15: each channel's
(or the tensor's) threshold is the fraction of the range with the least squared error over the
sample, searched on a grid (`CLIP_FRACTIONS`).

A `pre-rope` cache observes its keys before RoPE (the layer calls `observe` there when its
`before_rope` is set): each channel keeps its minimum and maximum, and its int4 range is shrunk
toward its middle by the fraction with the least squared error (the same grid). Its values are
calibrated as above; only the keys take an offset.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from surgery.formats.kv_cache import KVCacheFormat, KVQuantization
from surgery.ir.graph import DecoderGraph, ReferenceSequence
from surgery.ir.inputs import calibration_batches, on_device
from surgery.progress import counted

BATCH_ROWS = 8  # calibration samples per forward batch
SAMPLE_TOKENS = 2048  # tokens per layer kept for the clipping search
CLIP_FRACTIONS = torch.linspace(0.3, 1.0, 29)
ANGLES = 8  # angles per sampled key pair (the positions its values will be seen at)


class _LayerStatistics:
    """One layer's observed keys and values: per-channel maxima and a sample of tokens."""

    def __init__(self, stride: int, before_rope: bool = False):
        self.stride = stride
        self.before_rope = before_rope  # keys observed before RoPE: their range, not an envelope
        self.k_min: torch.Tensor | None = None  # (kv_heads, head_dim), before RoPE only
        self.k_max: torch.Tensor | None = None  # (kv_heads, head_dim): envelope on rotated channels
        self.v_max: torch.Tensor | None = None
        self.k_sample: list[torch.Tensor] = []  # (tokens, kv_heads, head_dim) each
        self.v_sample: list[torch.Tensor] = []

    def __call__(self, k: torch.Tensor, v: torch.Tensor, rotary: int, interleaved: bool = False) -> None:
        """Observe one batch's (batch, kv_heads, seq, head_dim) keys and values. With interleaved
        RoPE a pair is two adjacent channels: they are moved into halves for the pair arithmetic
        and back."""
        k = k.detach().float().permute(0, 2, 1, 3).reshape(-1, k.shape[1], k.shape[3])
        v = v.detach().float().permute(0, 2, 1, 3).reshape(-1, v.shape[1], v.shape[3])
        if self.before_rope:  # unrotated: each channel's own range, signed
            k_min, k_max, v_max = k.amin(0), k.amax(0), v.abs().amax(0)
            first = self.k_min is None
            self.k_min = k_min if first else torch.minimum(self.k_min, k_min)
            self.k_max = k_max if first else torch.maximum(self.k_max, k_max)
            self.v_max = v_max if first else torch.maximum(self.v_max, v_max)
            self.k_sample.append(k[:: self.stride].cpu())
            self.v_sample.append(v[:: self.stride].cpu())
            return
        order = _halves_order(rotary, k.shape[-1]) if interleaved and rotary else None
        back = torch.argsort(order) if order is not None else None
        if order is not None:
            k = k[..., order]
        envelope = _envelope(k, rotary)
        sample = _rotated(k[:: self.stride], rotary)
        if back is not None:
            envelope, sample = envelope[..., back], sample[..., back]
        k_max, v_max = envelope.amax(0), v.abs().amax(0)
        self.k_max = k_max if self.k_max is None else torch.maximum(self.k_max, k_max)
        self.v_max = v_max if self.v_max is None else torch.maximum(self.v_max, v_max)
        self.k_sample.append(sample.cpu())
        self.v_sample.append(v[:: self.stride].cpu())

    def quantization(self, fmt: KVCacheFormat) -> KVQuantization:
        """The layer's scales in `fmt` (and bases, for a `pre-rope` cache)."""
        v_threshold = _threshold(self.v_max.cpu(), torch.cat(self.v_sample), fmt)
        kv_heads, head_dim = self.k_max.shape
        shape = fmt.scale_shape(kv_heads, head_dim)
        v_scale = fmt.scale_of(v_threshold).reshape(shape)
        if fmt.before_rope:
            low, high = _range(self.k_min.cpu(), self.k_max.cpu(), torch.cat(self.k_sample), fmt)
            return KVQuantization(fmt, fmt.scale_of_range(low, high).reshape(shape), v_scale, low.reshape(shape),
                                  (v_scale * fmt.lowest).reshape(shape))  # fmt: skip
        k_threshold = _threshold(self.k_max.cpu(), torch.cat(self.k_sample), fmt)
        return KVQuantization(fmt, fmt.scale_of(k_threshold).reshape(shape), v_scale)


def _halves_order(rotary: int, head_dim: int) -> torch.Tensor:
    """Channel order that puts interleaved pairs (2i, 2i + 1) at (i, i + rotary / 2)."""
    return torch.cat([torch.arange(0, rotary, 2), torch.arange(1, rotary, 2), torch.arange(rotary, head_dim)])


def _envelope(k: torch.Tensor, rotary: int) -> torch.Tensor:
    """|k| with each rotated channel replaced by its pair's norm (what it reaches at some position)."""
    envelope = k.abs()
    half = rotary // 2
    if half:
        norm = torch.sqrt(k[..., :half].square() + k[..., half:rotary].square())
        envelope[..., :half] = norm
        envelope[..., half:rotary] = norm
    return envelope


def _rotated(k: torch.Tensor, rotary: int) -> torch.Tensor:
    """Sampled keys with each rotated pair turned through `ANGLES` fixed angles: the values its
    channels take at other positions (tokens x ANGLES, kv_heads, head_dim)."""
    half = rotary // 2
    if not half:
        return k
    angles = torch.arange(ANGLES, dtype=torch.float32) * (2 * torch.pi / ANGLES) + 0.1
    cos, sin = angles.cos()[:, None, None, None], angles.sin()[:, None, None, None]
    a, b = k[None, ..., :half], k[None, ..., half:rotary]
    turned = torch.cat([a * cos - b * sin, b * cos + a * sin, k[None, ..., rotary:].expand(ANGLES, -1, -1, -1)], -1)
    return turned.reshape(-1, *k.shape[1:])


def _threshold(maximum: torch.Tensor, sample: torch.Tensor, fmt: KVCacheFormat) -> torch.Tensor:
    """The magnitude that maps to the largest code: per channel (kv_heads, head_dim), or one."""
    if not fmt.per_channel:
        maximum = maximum.amax().reshape(1)
        sample = sample.reshape(-1, 1)
    else:
        sample = sample.reshape(sample.shape[0], -1)
        maximum = maximum.reshape(-1)
    if fmt.bits == 8:
        return maximum
    # int4: the clip with the least squared error, per channel, over the sample.
    best, best_error = maximum.clone(), torch.full_like(maximum, float("inf"))
    for fraction in CLIP_FRACTIONS.tolist():
        threshold = (maximum * fraction).clamp_min(torch.finfo(torch.float32).tiny)
        scale = fmt.scale_of(threshold)
        error = (fmt.fake_quantize(sample, scale) - sample).square().mean(0)
        better = error < best_error
        best = torch.where(better, threshold, best)
        best_error = torch.where(better, error, best_error)
    return best


def _range(low: torch.Tensor, high: torch.Tensor, sample: torch.Tensor, fmt: KVCacheFormat):
    """Each channel's (low, high) on the unsigned grid: the observed range for int8; for int4 the
    range shrunk toward its middle by the fraction with the least squared error over `sample`."""
    if fmt.bits == 8:
        return low, high
    sample = sample.reshape(sample.shape[0], -1)
    low, high = low.reshape(-1), high.reshape(-1)
    middle, half = (low + high) / 2, (high - low) / 2
    best = (low.clone(), high.clone())
    best_error = torch.full_like(low, float("inf"))
    for fraction in CLIP_FRACTIONS.tolist():
        lo, hi = middle - half * fraction, middle + half * fraction
        scale = fmt.scale_of_range(lo, hi)
        error = (fmt.fake_quantize(sample, scale, lo) - sample).square().mean(0)
        better = error < best_error
        best = (torch.where(better, lo, best[0]), torch.where(better, hi, best[1]))
        best_error = torch.where(better, error, best_error)
    return best[0].reshape(-1), best[1].reshape(-1)


@torch.no_grad()
def kv_quantizations(
    graph: DecoderGraph,
    formats: dict[int, KVCacheFormat],
    tokens: np.ndarray,
    progress: Callable[[str], None] = lambda _: None,
    device: str | None = None,
) -> dict[int, KVQuantization]:
    """Each layer of `formats` (original layer number -> its cache format) with scales calibrated
    on `tokens` (samples, length): one forward walk, a layer at a time."""
    runs = [ReferenceSequence(*(t.to(device) if device else t for t in batch))
            for batch in calibration_batches(tokens, BATCH_ROWS)]  # fmt: skip
    stride = max(1, tokens.size // SAMPLE_TOKENS)
    with graph.materialized(graph.embedding, device=device):
        hidden = [graph.embedding(run.input_ids) for run in runs]
    statistics: dict[int, _LayerStatistics] = {}
    last = max(formats)
    rotary = [graph.rotary.module] if graph.rotary is not None else []
    description = f"KV cache calibration: {len(formats)} layer(s), {tokens.size} tokens"
    with counted(progress, description, sum(1 for layer in graph.layers if layer.index <= last), "layer"), \
            on_device(rotary, device):  # fmt: skip
        for layer in graph.each_layer_materialized():
            if layer.index > last:
                break  # the layers after the last quantized cache change nothing it sees
            attention = layer.attention if layer.index in formats else None
            if attention is not None:
                before = formats[layer.index].before_rope
                attention.observe = statistics[layer.index] = _LayerStatistics(stride, before)
            try:
                with on_device(layer.modules(), device):
                    for i, run in enumerate(runs):
                        hidden[i], _ = run.through(layer, hidden[i], graph.rotary, None)
            finally:
                if attention is not None:
                    attention.observe = None
    return {index: statistics[index].quantization(fmt) for index, fmt in formats.items()}
