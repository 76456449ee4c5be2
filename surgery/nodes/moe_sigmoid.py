"""LFM2-MoE's mixture of experts: sigmoid router scores, the experts chosen by the top k of the
scores plus a selection bias (`expert_bias`, for load balancing), and mixed by their unbiased
scores, renormalized over the chosen ones (`/ (sum + 1e-6)`, by `norm_topk_prob`) and scaled by
`routed_scaling_factor`. The experts are the usual stacked SwiGLU (`gate_up_proj` with gate rows
first, `down_proj`).

In ONNX, plain ops: the router as above gives a dense (batch, seq, experts) weight matrix, zero
for experts a token did not choose, and `mix_experts` runs every expert on every token and sums
with those weights, exact for this routing (onnxruntime's MoE operator knows only a softmax).
"""

from __future__ import annotations

from surgery.nodes.context import EmitContext
from surgery.nodes.moe import MixtureOfExperts, mix_experts


class SigmoidRoutedMoE(MixtureOfExperts):
    """The node for an LFM2-MoE block (`gate`, `experts`, `expert_bias`): it runs the block's own
    forward (`MixtureOfExperts`) and emits its routing and experts."""

    def emit(self, e: EmitContext, x: str, name: str) -> str:
        """Router (sigmoid, biased top-k, renormalized and scaled weights of the chosen experts),
        then every expert on every token summed with those weights."""
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
        if gate.norm_topk_prob:
            total = w.op("ReduceSum", [top, c([-1])], f"/{name}/router/sum", keepdims=1)
            total = w.op("Add", [total, e.scalar(1e-6)], f"/{name}/router/sum_eps")
            top = w.op("Div", [top, total], f"/{name}/router/normalize")
        if float(gate.routed_scaling_factor) != 1.0:
            top = w.op("Mul", [top, e.scalar(float(gate.routed_scaling_factor))], f"/{name}/router/scaled")
        zeros = w.op("Mul", [scores, c(0.0, e.dtype)], f"/{name}/router/zeros")
        dense = w.op("ScatterElements", [zeros, chosen, top], f"/{name}/router/weights", axis=-1)
        return mix_experts(e, self.block.experts, x, dense, name)
