"""gpt-oss's mixture of experts: a router with a bias whose top-k logits are softmaxed, experts
with biases, and a SwiGLU clamped at `limit` with the up projection shifted by one:
`(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`, `g = min(gate, limit)`.

The gate and up columns of `experts.gate_up_proj` (experts, hidden, 2 * inter) interleave (gate
in even columns), which is the layout onnxruntime's MoE operator reads with `swiglu_fusion=1`;
its `swiglu_limit`, `activation_alpha` and `activation_beta` are this activation's constants,
and a softmax over all logits renormalized over the top k equals the softmax of the top k.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.nodes.context import EmitContext
from surgery.nodes.moe import weighted_sum


class ClampedSwiGLUMoE(torch.nn.Module):
    """The node for a gpt-oss MLP block (`router`, `experts`): it runs the block's own forward and
    emits onnxruntime's MoE operator. The parameters stay the block's own."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    @property
    def experts(self) -> torch.nn.Module:
        """The stacked experts (`gate_up_proj`, `down_proj` and their biases)."""
        return self.block.experts

    @property
    def top_k(self) -> int:
        """Experts per token."""
        return int(self.block.router.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for the (normalized) residual x (its router scores dropped)."""
        return self.block(x)[0]

    def emit(self, e: EmitContext, x: str, name: str) -> str:
        """The router MatMul and bias, then one MoE node running only each token's chosen experts
        (or, with `moe_operator` plain, every expert on every token in plain ops)."""
        w, c = e.w, e.w.constant
        router, experts = self.block.router, self.block.experts
        hidden = int(router.weight.shape[1])
        logits = w.op("MatMul", [x, w.weight(f"{name}.router.weight", e.array(router.weight).T)],
                      f"/{name}/router/MatMul")  # fmt: skip
        logits = w.op("Add", [logits, w.weight(f"{name}.router.bias", e.array(router.bias))], f"/{name}/router/Add")
        if e.options.moe_operator != "contrib":
            return self._plain(e, x, logits, name)
        rows = w.op("Reshape", [x, c([-1, hidden])], f"/{name}/moe/rows")
        router_rows = w.op("Reshape", [logits, c([-1, int(router.weight.shape[0])])], f"/{name}/moe/router_rows")
        # (experts, in, out) as stored -> (experts, out, in) as the operator reads them.
        fc1 = np.ascontiguousarray(e.array(experts.gate_up_proj).transpose(0, 2, 1))
        fc2 = np.ascontiguousarray(e.array(experts.down_proj).transpose(0, 2, 1))
        inputs = [rows, router_rows,
                  w.weight(f"{name}.experts.gate_up_proj", fc1), w.weight(f"{name}.experts.gate_up_proj_bias",
                                                                          e.array(experts.gate_up_proj_bias)),
                  w.weight(f"{name}.experts.down_proj", fc2), w.weight(f"{name}.experts.down_proj_bias",
                                                                     e.array(experts.down_proj_bias))]  # fmt: skip
        out = w.op("MoE", inputs, f"/{name}/moe/MoE", domain="com.microsoft", k=self.top_k,
                   activation_type="swiglu", swiglu_fusion=1, swiglu_limit=float(experts.limit),
                   activation_alpha=float(experts.alpha), activation_beta=1.0,
                   normalize_routing_weights=1)  # fmt: skip
        return w.op("Reshape", [out, w.op("Shape", [x], f"/{name}/moe/shape")], f"/{name}/moe/out")

    def _plain(self, e: EmitContext, x: str, logits: str, name: str) -> str:
        """Top-k logits softmaxed into dense (tokens, experts) weights, zero elsewhere; every expert
        on every token as batched MatMuls over the stacked weights, summed with those weights."""
        w, c = e.w, e.w.constant
        experts = self.block.experts
        top, index = w.node("TopK", [logits, c([self.top_k])], f"/{name}/router/TopK", 2, axis=-1)
        top = w.op("Softmax", [top], f"/{name}/router/Softmax", axis=-1)
        zeros = w.op("Mul", [logits, c(0.0, e.dtype)], f"/{name}/router/zeros")
        dense = w.op("ScatterElements", [zeros, index, top], f"/{name}/router/weights", axis=-1)
        xs = w.op("Unsqueeze", [x, c([1])], f"/{name}/experts/x")  # (batch, 1, seq, hidden)

        def stacked(weight, bias, label: str, inputs: str) -> str:  # (experts, in, out) as stored
            product = w.op("MatMul", [inputs, w.weight(f"{name}.experts.{label}", e.array(weight))],
                           f"/{name}/experts/{label}")  # fmt: skip
            return w.op("Add", [product, w.weight(f"{name}.experts.{label}_bias", e.array(bias)[:, None])],
                        f"/{name}/experts/{label}_bias")  # fmt: skip

        both = stacked(experts.gate_up_proj, experts.gate_up_proj_bias, "gate_up_proj", xs)
        end = c([np.iinfo(np.int64).max])
        gate = w.op("Slice", [both, c([0]), end, c([-1]), c([2])], f"/{name}/experts/gate")
        up = w.op("Slice", [both, c([1]), end, c([-1]), c([2])], f"/{name}/experts/up")
        limit = float(experts.limit)
        gate = w.op("Min", [gate, c(limit, e.dtype)], f"/{name}/experts/gate_clamp")
        up = w.op("Clip", [up, c(-limit, e.dtype), c(limit, e.dtype)], f"/{name}/experts/up_clamp")
        sig = w.op("Sigmoid", [w.op("Mul", [gate, c(float(experts.alpha), e.dtype)], f"/{name}/experts/alpha")],
                   f"/{name}/experts/Sigmoid")  # fmt: skip
        glu = w.op("Mul", [gate, sig], f"/{name}/experts/glu")
        act = w.op("Mul", [w.op("Add", [up, c(1.0, e.dtype)], f"/{name}/experts/up_plus_one"), glu],
                   f"/{name}/experts/Mul")  # fmt: skip
        out = stacked(experts.down_proj, experts.down_proj_bias, "down_proj", act)  # (batch, experts, seq, hidden)
        return weighted_sum(e, out, dense, name)
