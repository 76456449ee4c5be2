"""The norms a layer may hold, statistics in fp32: RMSNorm `x / rms(x) * (offset + w)`, and
LayerNorm `(x - mean) / std * (offset + w) + b` (OLMo's non-parametric one has no `w` or `b`). Each runs in PyTorch and
emits itself alone or fused with the residual add before it."""

from __future__ import annotations

import numpy as np
import torch

from surgery.nodes.context import MS, EmitContext


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last axis. `offset` is 1 for Gemma's `1 + w` gains, else 0."""

    has_weight = True  # its gain is a parameter of the model

    def __init__(self, weight: torch.nn.Parameter, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = weight  # the Hugging Face parameter itself
        self.eps = float(eps)
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize in fp32, scale by the gain, return in x's type."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (self.offset + self.weight.float())).to(x.dtype)

    def gain(self, e: EmitContext, scale: float = 1.0) -> np.ndarray:
        """The effective gain `(offset + w) * scale` (fusion folds a mixing weight in as `scale`)."""
        gain = e.array(self.weight.detach().float() + self.offset)
        return gain * np.asarray(scale, dtype=gain.dtype) if scale != 1.0 else gain

    def emit(self, e: EmitContext, x: str, name: str, gamma: str | None = None, scale: float = 1.0) -> str:
        """SimplifiedLayerNormalization of `x` (fp32 statistics); `gamma` holds any `scale` already."""
        gamma = gamma or e.w.weight(f"{name}.weight", self.gain(e))
        return e.w.op("SimplifiedLayerNormalization", [x, gamma], name, axis=-1, epsilon=self.eps, stash_type=1)

    def emit_skip(self, e: EmitContext, update: str, residual: str, name: str, gamma: str | None = None,
                  scale: float = 1.0):  # fmt: skip
        """`residual + update` and its norm in one fused node: (normalized, new residual)."""
        gamma = gamma or e.w.weight(f"{name}.weight", self.gain(e))
        # Outputs 1 and 2 (mean, inverse std) are for training; left unnamed, they are never computed.
        out, _, _, total = e.w.node(
            "SkipSimplifiedLayerNormalization",
            [update, residual, gamma],
            name,
            [f"{name}/output_0", "", "", f"{name}/output_3"],
            MS,
            epsilon=self.eps,
        )
        return out, total


class LayerNorm(torch.nn.Module):
    """LayerNorm over the last axis: `(x - mean(x)) / std(x) * (offset + w) + b`. OLMo's
    non-parametric one has no `w` (a gain of 1) and no `b`; Nemotron's stores `w` for a gain of
    `1 + w` (`offset` 1) and has a bias."""

    def __init__(self, weight: torch.nn.Parameter | None, eps: float, size: int, offset: float = 0.0,
                 bias: torch.nn.Parameter | None = None):  # fmt: skip
        super().__init__()
        self.weight = weight  # the Hugging Face parameter itself, or None
        self.bias = bias
        self.eps = float(eps)
        self.size = int(size)
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize in fp32, scale by the gain and shift by the bias if any, return in x's type."""
        weight = self.weight.float() + self.offset if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return torch.nn.functional.layer_norm(x.float(), (self.size,), weight, bias, self.eps).to(x.dtype)

    @property
    def has_weight(self) -> bool:
        """Whether the gain is a parameter of the model (else it is 1, written only for the kernel)."""
        return self.weight is not None

    def gain(self, e: EmitContext, scale: float = 1.0) -> np.ndarray:
        """The gain `(offset + w) * scale` (ones without a weight)."""
        if self.weight is None:
            gain = np.ones(self.size, e.dtype)
        else:
            gain = e.array(self.weight.detach().float() + self.offset)
        return gain * np.asarray(scale, dtype=gain.dtype) if scale != 1.0 else gain

    def _beta(self, e: EmitContext, name: str, scale: float) -> str:
        """The bias, scaled as the gain is (zeros, written only for the kernel, without one)."""
        if self.bias is None:
            return e.w.weight(f"{name}.bias", np.zeros(self.size, e.dtype), parameter=False)
        beta = e.array(self.bias.detach().float())
        if scale != 1.0:
            return e.w.weight(f"{name}.bias_x{scale:g}", beta * np.asarray(scale, beta.dtype), parameter=False)
        return e.w.weight(f"{name}.bias", beta)

    def emit(self, e: EmitContext, x: str, name: str, gamma: str | None = None, scale: float = 1.0) -> str:
        """LayerNormalization of `x` (fp32 statistics); `scale` is what `gamma` was multiplied by."""
        gamma = gamma or e.w.weight(f"{name}.weight", self.gain(e), parameter=self.has_weight)
        return e.w.op("LayerNormalization", [x, gamma, self._beta(e, name, scale)], name, axis=-1,
                      epsilon=self.eps, stash_type=1)  # fmt: skip

    def emit_skip(self, e: EmitContext, update: str, residual: str, name: str, gamma: str | None = None,
                  scale: float = 1.0):  # fmt: skip
        """`residual + update` and its LayerNorm in one fused node: (normalized, new residual)."""
        gamma = gamma or e.w.weight(f"{name}.weight", self.gain(e), parameter=self.has_weight)
        out, _, _, total = e.w.node(
            "SkipLayerNormalization",
            [update, residual, gamma, self._beta(e, name, scale)],
            name,
            [f"{name}/output_0", "", "", f"{name}/output_3"],
            MS,
            epsilon=self.eps,
        )
        return out, total
