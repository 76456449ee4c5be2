"""LFM2-MoE's mixture of experts: sigmoid router scores, the experts chosen by the top k of the
scores plus a selection bias (`expert_bias`, for load balancing), and mixed by their unbiased
scores, renormalized over the chosen ones (`/ (sum + 1e-6)`, by `norm_topk_prob`) and scaled by
`routed_scaling_factor`. The experts are the usual stacked SwiGLU (`gate_up_proj` with gate rows
first, `down_proj`).

In ONNX the router is written as above. By default onnxruntime's MoE operator then runs only the
chosen experts: it knows only a softmax over the top k, so it is fed the log of the chosen scores
(a softmax of which is `s_i / sum`) and the output is scaled per token to the block's weights, as
onnxruntime-genai's builder does for these models. With `moe_operator` plain, the weights become a
dense (batch, seq, experts) matrix and `mix_experts` runs every expert on every token.
"""

from __future__ import annotations

import numpy as np

from surgery.nodes.context import EmitContext
from surgery.nodes.moe import MixtureOfExperts, contrib_moe, mix_experts


class SigmoidRoutedMoE(MixtureOfExperts):
    """The node for an LFM2-MoE block (`gate`, `experts`, `expert_bias`): it runs the block's own
    forward (`MixtureOfExperts`) and emits its routing and experts."""

    def emit(self, e: EmitContext, x: str, name: str) -> str:
        """Router (sigmoid, biased top-k, renormalized and scaled weights of the chosen experts),
        then the chosen experts: onnxruntime's MoE operator (the default), or every expert on
        every token in plain ops (`moe_operator` plain)."""
        w, c = e.w, e.w.constant
        gate = self.block.gate
        logits = w.op("MatMul", [x, w.weight(f"{name}.gate.weight", e.array(gate.weight).T)], f"/{name}/router/MatMul")
        scores = w.op("Sigmoid", [logits], f"/{name}/router/Sigmoid")
        ranked = scores
        if getattr(self.block, "use_expert_bias", False):
            bias = w.weight(f"{name}.expert_bias", e.array(self.block.expert_bias), parameter=False)
            ranked = w.op("Add", [scores, bias], f"/{name}/router/biased")
        _, chosen = w.node("TopK", [ranked, c([int(gate.top_k)])], f"/{name}/router/TopK", 2, axis=-1)
        top = w.op("GatherElements", [scores, chosen], f"/{name}/router/chosen_scores", axis=-1)
        total = w.op("ReduceSum", [top, c([-1])], f"/{name}/router/sum", keepdims=1)
        if e.options.moe_operator == "contrib":
            return self._contrib(e, x, scores, chosen, top, total, name)
        if gate.norm_topk_prob:
            top = w.op("Div", [top, w.op("Add", [total, e.scalar(1e-6)], f"/{name}/router/sum_eps")],
                       f"/{name}/router/normalize")  # fmt: skip
        if float(gate.routed_scaling_factor) != 1.0:
            top = w.op("Mul", [top, e.scalar(float(gate.routed_scaling_factor))], f"/{name}/router/scaled")
        zeros = w.op("Mul", [scores, c(0.0, e.dtype)], f"/{name}/router/zeros")
        dense = w.op("ScatterElements", [zeros, chosen, top], f"/{name}/router/weights", axis=-1)
        return mix_experts(e, self.block.experts, x, dense, name)

    def _contrib(self, e: EmitContext, x: str, scores: str, chosen: str, top: str, total: str, name: str) -> str:
        """onnxruntime's MoE operator takes a softmax over the top k of its router input: fed the
        log of the chosen scores and a far lower value elsewhere, it picks our experts and weighs
        them `s_i / sum`. The mixture is then scaled to the block's weights: by `sum / (sum + 1e-6)`
        where the block renormalizes, by `sum` where it does not, times `routed_scaling_factor`
        (one factor per token, so the output is scaled instead of each expert's weight)."""
        w, c = e.w, e.w.constant
        gate = self.block.gate
        floor = w.op("Max", [top, e.scalar(1e-30 if e.dtype == np.float32 else 1e-7)], f"/{name}/router/floor")
        logs = w.op("Log", [floor], f"/{name}/router/log")
        others = w.op("Add", [w.op("Mul", [scores, c(0.0, e.dtype)], f"/{name}/router/zeros"),
                              e.scalar(-1e4)], f"/{name}/router/others")  # fmt: skip
        router = w.op("ScatterElements", [others, chosen, logs], f"/{name}/router/log_weights", axis=-1)
        mixed = contrib_moe(e, self.block, x, router, int(gate.top_k), True, name)
        factor = total
        if gate.norm_topk_prob:
            factor = w.op("Div", [total, w.op("Add", [total, e.scalar(1e-6)], f"/{name}/router/sum_eps")],
                          f"/{name}/router/renormalized")  # fmt: skip
        if float(gate.routed_scaling_factor) != 1.0:
            factor = w.op("Mul", [factor, e.scalar(float(gate.routed_scaling_factor))], f"/{name}/router/scaled")
        return w.op("Mul", [mixed, factor], f"/{name}/moe/weights_scaled")
