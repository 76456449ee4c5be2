"""Phi-MoE's mixture of experts: SwiGLU experts in the common stacked layout, routed by
SparseMixer (two experts per token, chosen one after the other).

At inference SparseMixer takes the best-scoring expert, weighted by a softmax over the scores
that lie within `2 * jitter_eps` (relative) of the best; then the best of the others, weighted by
a softmax over the others within the same distance of the second best. Neither is a top-k of one
softmax, so the router is emitted in plain ops (onnxruntime's MoE operator only implements it
on CUDA); the experts then mix as in `surgery.nodes.moe.mix_experts`.
"""

from __future__ import annotations

import torch

from surgery.nodes.context import EmitContext
from surgery.nodes.moe import MixtureOfExperts, mix_experts


class SparseMixerMoE(MixtureOfExperts):
    """The node for a Phi-MoE block (`router`, `experts`): it runs the block's own forward and emits
    the SparseMixer routing and the experts. `gate` is the router, as the other MoE nodes name it."""

    @property
    def gate(self) -> torch.nn.Module:
        """The router (a linear layer over the hidden state; two experts per token)."""
        return self.block.router

    def emit(self, e: EmitContext, x: str, name: str) -> str:
        """Router MatMul, SparseMixer's two picks as dense weights, every expert mixed by them."""
        w = e.w
        router = self.block.router
        weight = w.weight(f"{name}.gate.weight", e.array(router.weight).T)
        logits = w.op("MatMul", [x, weight], f"/{name}/router/MatMul")
        dense = self._routing(e, logits, float(router.router_jitter_noise), name)
        return mix_experts(e, self.block.experts, x, dense, name)

    def _routing(self, e: EmitContext, scores: str, jitter_eps: float, name: str) -> str:
        """(batch, seq, experts) weights: SparseMixer's first and second choices, zero elsewhere."""
        w, c = e.w, e.w.constant
        lowest = c(float("-inf"), e.dtype)
        magnitude = w.op("Abs", [scores], f"/{name}/router/abs")

        def pick(candidates: str, label: str) -> tuple[str, str]:
            """(index, weight) of the best candidate, its weight a softmax over those near it."""
            best = w.op("ReduceMax", [candidates, c([-1])], f"/{name}/router/{label}_max", keepdims=1)
            index = w.op("ArgMax", [candidates], f"/{name}/router/{label}_argmax", axis=-1, keepdims=1)
            factor = w.op("Max", [magnitude, best], f"/{name}/router/{label}_factor")
            gap = w.op("Div", [w.op("Sub", [best, scores], f"/{name}/router/{label}_gap"), factor],
                       f"/{name}/router/{label}_relative")  # fmt: skip
            far = w.op("Greater", [gap, c(2 * jitter_eps, e.dtype)], f"/{name}/router/{label}_far")
            near = w.op("Where", [far, lowest, candidates], f"/{name}/router/{label}_near")
            probs = w.op("Softmax", [near], f"/{name}/router/{label}_softmax", axis=-1)
            return index, w.op("GatherElements", [probs, index], f"/{name}/router/{label}_weight", axis=-1)

        first, first_weight = pick(scores, "first")
        others = w.op("ScatterElements", [scores, first, w.op("Expand", [lowest, w.op("Shape", [first],
                      f"/{name}/router/first_shape")], f"/{name}/router/minus_inf")],
                      f"/{name}/router/others", axis=-1)  # fmt: skip
        second, second_weight = pick(others, "second")
        index = w.op("Concat", [first, second], f"/{name}/router/index", axis=-1)
        weights = w.op("Concat", [first_weight, second_weight], f"/{name}/router/top", axis=-1)
        zeros = w.op("Mul", [scores, c(0.0, e.dtype)], f"/{name}/router/zeros")
        return w.op("ScatterElements", [zeros, index, weights], f"/{name}/router/weights", axis=-1)



