"""The head: final norm, vocabulary projection, and the logit post-processing some families add
(Granite divides by `logits_scaling`; Gemma 2-style models soft-cap with tanh)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from onnx import TensorProto

from surgery.nodes.context import EmitContext
from surgery.nodes.norm import RMSNorm

if TYPE_CHECKING:
    from surgery.nodes.fusion import HeadFusion


class Head(torch.nn.Module):
    """`post(W FinalNorm(h))`; `weight` is the Hugging Face head (or the tied embedding) itself."""

    def __init__(self, final_norm: RMSNorm, weight: torch.nn.Parameter, divisor: float = 1.0,
                 softcap: float | None = None, tied: bool = False, bias: torch.nn.Parameter | None = None):  # fmt: skip
        super().__init__()
        self.final_norm = final_norm
        self.weight = weight
        self.bias = bias  # Phi-MoE's head has one; added before the rest of the post-processing
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
        """The family's logit post-processing (the bias first, where the head has one)."""
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def emit_post(self, e: EmitContext, logits: str, name: str, output: str | None = None) -> str:
        """The post-processing in ONNX; the last node writes `output` when given."""
        steps = []
        if self.bias is not None:
            steps.append(("Add", e.w.weight("lm_head.bias", e.array(self.bias))))
        if self.divisor != 1.0:
            steps.append(("Div", self.divisor))
        if self.softcap is not None:
            steps += [("Div", self.softcap), ("Tanh", None), ("Mul", self.softcap)]
        for i, (op, value) in enumerate(steps):
            inputs = [logits] if value is None else [logits, value if isinstance(value, str) else e.scalar(value)]
            outputs = [output] if output and i == len(steps) - 1 else [f"{name}/{op}_{i}"]
            logits = e.w.node(op, inputs, f"{name}/{op}_{i}", outputs)[0]
        return logits

    @property
    def has_post(self) -> bool:
        """Whether the family post-processes its logits at all."""
        return self.bias is not None or self.divisor != 1.0 or self.softcap is not None

    def emit(
        self,
        e: EmitContext,
        embed: str,
        vocab: int,
        fusion: HeadFusion | None = None,
        readouts: dict[int, tuple[str | None, str]] | None = None,
    ) -> None:
        """The final norm (fusing the last pending residual add), the vocabulary projection and
        the post-processing, writing the `logits` output; layer fusion's mix when the graph fuses.

        The projection is the embedding table `embed` transposed when the head shares it, else
        the head's own weight: a float MatMul, or the weight format's node when the export
        quantizes the head (written as it is quantized; never a shared table, never under
        dynamic fusion, whose one MatMul also projects every readout).
        """
        w = e.w
        shares_table = self.tied and not e.options.untie_head
        if fusion is None:
            x = e.pre(self.final_norm, "model.norm")
        else:
            x = e.pre(self.final_norm, "model.norm", scale=1 - fusion.weight, derived=False)
        dynamic = fusion is not None and fusion.dynamic
        quantized = e.quantizes("lm_head") and not shares_table and not dynamic
        if not quantized:
            e.linears["lm_head"] = "/lm_head/MatMul"
            operand = self.float_operand(e, embed, shares_table)
        if dynamic:
            post = (lambda logits: self.emit_post(e, logits, "/lm_head/post")) if self.has_post else None
            fusion.emit_dynamic(e, x, operand, [readouts[layer] for layer in fusion.layers], vocab, post)
        else:
            if fusion is not None:
                x = fusion.emit_static(e, x, readouts)
            output = "/lm_head/MatMul/output" if self.has_post else "logits"
            if quantized:
                # A tied head written separately is the same parameters again: not counted twice.
                logits = e.linear("lm_head", x, self.weight, "lm_head.weight", "/lm_head/MatMul", output,
                                  parameter=not self.tied)  # fmt: skip
            else:
                logits = w.node("MatMul", [x, operand], "/lm_head/MatMul", [output])[0]
            if self.has_post:
                self.emit_post(e, logits, "/lm_head/post", "logits")
        w.add_output("logits", e.element.onnx_type, ["batch_size", "sequence_length", vocab])
        if dynamic:
            w.add_output("fused_layer", TensorProto.INT64, ["batch_size", "sequence_length"])

    def float_operand(self, e: EmitContext, embed: str, shares_table: bool) -> str:
        """The head's float (hidden, vocab) operand: the embedding table transposed, or its own weight."""
        if shares_table:
            # Stored once; onnxruntime folds the transpose of a constant when the session loads.
            return e.w.op("Transpose", [embed], "/lm_head/Transpose", perm=[1, 0])
        # A tied head written separately is the same parameters again: not counted twice.
        return e.w.weight("lm_head.weight", e.array(self.weight).T, parameter=not self.tied)
