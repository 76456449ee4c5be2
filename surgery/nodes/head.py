"""The head: final norm, vocabulary projection, and the logit post-processing some families add
(Granite divides by `logits_scaling`; Gemma 2-style models soft-cap with tanh)."""

from __future__ import annotations

import torch

from surgery.nodes.context import EmitContext
from surgery.nodes.norm import RMSNorm


class Head(torch.nn.Module):
    """`post(W FinalNorm(h))`; `weight` is the Hugging Face head (or the tied embedding) itself."""

    def __init__(self, final_norm: RMSNorm, weight: torch.nn.Parameter, divisor: float = 1.0,
                 softcap: float | None = None, tied: bool = False):  # fmt: skip
        super().__init__()
        self.final_norm = final_norm
        self.weight = weight
        self.divisor = float(divisor)
        self.softcap = softcap
        self.tied = tied

    @property
    def is_linear(self) -> bool:
        """Whether logits are linear in the normalized residual (layer fusion folds into one MatMul then)."""
        return self.softcap is None

    def project(self, normalized: torch.Tensor) -> torch.Tensor:
        """Logits of an already normalized residual."""
        return self.post(torch.nn.functional.linear(normalized, self.weight))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) of the last residual."""
        return self.project(self.final_norm(hidden))

    def post(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's logit post-processing."""
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def emit_post(self, e: EmitContext, logits: str, name: str, output: str | None = None) -> str:
        """The post-processing in ONNX; the last node writes `output` when given."""
        steps = []
        if self.divisor != 1.0:
            steps.append(("Div", self.divisor))
        if self.softcap is not None:
            steps += [("Div", self.softcap), ("Tanh", None), ("Mul", self.softcap)]
        for i, (op, value) in enumerate(steps):
            inputs = [logits] if value is None else [logits, e.scalar(value)]
            outputs = [output] if output and i == len(steps) - 1 else [f"{name}/{op}_{i}"]
            logits = e.w.node(op, inputs, f"{name}/{op}_{i}", outputs)[0]
        return logits

    @property
    def has_post(self) -> bool:
        """Whether the family post-processes its logits at all."""
        return self.divisor != 1.0 or self.softcap is not None
