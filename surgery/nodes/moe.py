"""The mixture-of-experts MLP node: transformers' MoE blocks and surgery's own (split, pruned,
merged, low-rank) ones, which share a layout: a router `gate` (weight: experts x hidden,
`top_k`) and stacked `experts.gate_up_proj` / `experts.down_proj`. In PyTorch these modules run
themselves; in ONNX they emit themselves with `emit_moe` (transformers' blocks through the
`MixtureOfExperts` node that wraps them, surgery's through `EmitsMoE`).
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.nodes.context import EmitContext
from surgery.nodes.mlp import GatedMLP


def is_moe(module: torch.nn.Module) -> bool:
    """Whether an MLP module is a mixture of experts (this component's kind)."""
    return hasattr(module, "experts")


class EmitsMoE:
    """Mixed into surgery's own MoE modules: they emit themselves as `emit_moe` writes a MoE."""

    def emit(self, e: EmitContext, x: str, name: str) -> str:
        """This MoE's router, experts and mixture (see `emit_moe`)."""
        return emit_moe(e, self, x, name)


class MixtureOfExperts(EmitsMoE, torch.nn.Module):
    """The node for a transformers MoE block: it runs the block's own forward and emits itself.

    The block's parts (`gate`, `experts`, `shared_expert`, ...) read through the node, so
    passes and analyses see one MoE layout whatever built it; the parameters stay the block's
    own (references, not copies)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for the (normalized) residual x."""
        return self.block(x)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)


def softmax_routed(moe: torch.nn.Module) -> bool:
    """Whether a MoE layer routes as onnxruntime's MoE operator does: softmax, top-k, optional
    renormalization, over dense experts (not a split's unit weights, merged groups or factors)."""
    return not (
        getattr(moe.gate, "unit_weights", False) or hasattr(moe, "group_of") or hasattr(moe.experts, "gate_up_left")
    )


def _stacked_t(e: EmitContext, stacked: torch.Tensor) -> np.ndarray:
    """Stacked (experts, out, in) weights as (experts, in, out) for a batched MatMul."""
    return np.ascontiguousarray(e.array(stacked).transpose(0, 2, 1))


def emit_moe(e: EmitContext, moe: torch.nn.Module, x: str, name: str) -> str:
    """A mixture-of-experts MLP in plain ONNX ops, exact for any routing.

    Router: softmax over the expert logits, top-k, optionally renormalized (Mixtral
    always, Qwen by `norm_topk_prob`); a split MLP (surgery.analysis.moe) gives each chosen expert
    weight 1. The chosen weights are scattered into a dense (tokens, experts) matrix, zero
    elsewhere; every expert runs on every token as one batched MatMul over stacked
    weights, and the outputs are summed with those weights, so each token gets exactly
    its top-k experts' mixture.
    """
    w = e.w
    top_k = int(moe.gate.top_k)
    # Qwen's routers say whether they renormalize, DeepSeek's block config does; Mixtral's always does.
    normalize = getattr(moe.gate, "norm_topk_prob", None)
    if normalize is None:
        normalize = getattr(getattr(moe, "config", None), "norm_topk_prob", True)
    normalize = bool(normalize)
    logits = w.op("MatMul", [x, w.weight(f"{name}.gate.weight", e.array(moe.gate.weight).T)], f"/{name}/router/MatMul")
    if e.options.moe_operator == "contrib" and softmax_routed(moe):
        mixed = contrib_moe(e, moe, x, logits, top_k, normalize, name)
    else:
        mixed = plain_moe(e, moe, x, logits, top_k, normalize, name)
    scale = float(getattr(moe.gate, "routed_scaling_factor", 1.0))
    if scale != 1.0:  # DeepSeek scales every routing weight: the mixture, by linearity
        mixed = w.op("Mul", [mixed, e.scalar(scale)], f"/{name}/routed_scale")
    always = getattr(moe, "shared_experts", None)
    if always is not None:  # DeepSeek: shared experts on every token, ungated
        shared_out = GatedMLP(always.gate_proj, always.up_proj, always.down_proj).emit(e, x, f"{name}.shared_experts")
        mixed = w.op("Add", [mixed, shared_out], f"/{name}/shared_experts/Add")
    shared = getattr(moe, "shared_expert", None)
    if shared is not None:  # Qwen2-MoE: sigmoid(gate(x)) * shared_expert(x), added
        shared_out = GatedMLP(shared.gate_proj, shared.up_proj, shared.down_proj).emit(e, x, f"{name}.shared_expert")
        gate_w = w.weight(f"{name}.shared_expert_gate.weight", e.array(moe.shared_expert_gate.weight).T)
        scale = w.op("Sigmoid", [w.op("MatMul", [x, gate_w], f"/{name}/shared_gate/MatMul")], f"/{name}/shared_gate")
        mixed = w.op("Add", [mixed, w.op("Mul", [shared_out, scale], f"/{name}/shared/Mul")], f"/{name}/shared/Add")
    return mixed


def contrib_moe(
    e: EmitContext, moe: torch.nn.Module, x: str, logits: str, top_k: int, normalize: bool, name: str
) -> str:
    """onnxruntime's com.microsoft.MoE: softmax, top-k, (renormalize), and only the chosen
    experts' SwiGLU per token. Its CPU kernel wants gate and up rows interleaved."""
    w, c = e.w, e.w.constant
    gate_up = e.array(moe.experts.gate_up_proj)  # (experts, 2I, hidden): gate rows then up rows
    experts, two_inter, hidden = gate_up.shape
    pairs = gate_up.reshape(experts, 2, two_inter // 2, hidden).transpose(0, 2, 1, 3)  # (e, I, gate|up, h)
    interleaved = np.ascontiguousarray(pairs.reshape(experts, two_inter, hidden))
    rows = w.op("Reshape", [x, c([-1, hidden])], f"/{name}/moe/rows")
    router = w.op("Reshape", [logits, c([-1, experts])], f"/{name}/moe/router_rows")
    inputs = [rows, router, w.weight(f"{name}.experts.gate_up_interleaved", interleaved), "",
              w.weight(f"{name}.experts.down_proj", e.array(moe.experts.down_proj))]  # fmt: skip
    out = w.op("MoE", inputs, f"/{name}/moe/MoE", domain="com.microsoft", k=top_k,
               activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=int(normalize))  # fmt: skip
    return w.op("Reshape", [out, w.op("Shape", [x], f"/{name}/moe/shape")], f"/{name}/moe/out")


def plain_moe(e: EmitContext, moe: torch.nn.Module, x: str, logits: str, top_k: int, normalize: bool, name: str) -> str:
    """Dense routing weights and every expert on every token (see `moe`)."""
    w, c = e.w, e.w.constant
    experts = moe.experts
    unit = getattr(moe.gate, "unit_weights", False)  # a split MLP: each chosen expert counts once
    # A split's router ranks raw scores, as PyTorch does; a softmax first could round two
    # close scores to one probability and break the tie differently.
    probs = logits if unit else w.op("Softmax", [logits], f"/{name}/router/Softmax", axis=-1)
    top, index = w.node("TopK", [probs, c([top_k])], f"/{name}/router/TopK", 2, axis=-1)
    if unit:
        top = w.op("Add", [w.op("Mul", [top, c(0.0, e.dtype)], f"/{name}/router/zero"), c(1.0, e.dtype)],
                   f"/{name}/router/ones")  # fmt: skip
    elif normalize:
        total = w.op("ReduceSum", [top, c([-1])], f"/{name}/router/sum", keepdims=1)
        top = w.op("Div", [top, total], f"/{name}/router/normalize")
    zeros = w.op("Mul", [probs, c(0.0, e.dtype)], f"/{name}/router/zeros")
    if hasattr(moe, "group_of"):
        # Merged experts: each chosen original expert maps to its group; weights on one group add up.
        groups = int(moe.experts.gate_up_proj.shape[0])
        index = w.op("Gather", [c(moe.group_of.tolist()), index], f"/{name}/router/group_of")
        zeros = w.op("Slice", [zeros, c([0]), c([groups]), c([-1])], f"/{name}/router/group_zeros")
        dense = w.op("ScatterElements", [zeros, index, top], f"/{name}/router/weights", axis=-1, reduction="add")
    else:
        dense = w.op("ScatterElements", [zeros, index, top], f"/{name}/router/weights", axis=-1)
    return mix_experts(e, experts, x, dense, name)


def mix_experts(e: EmitContext, experts: torch.nn.Module, x: str, dense: str, name: str) -> str:
    """Every SwiGLU expert on every token as batched MatMuls, summed with the dense (batch, seq,
    experts) routing weights (zero for experts a token did not choose)."""
    w, c = e.w, e.w.constant
    # (batch, seq, hidden) -> (batch, 1, seq, hidden) against (experts, hidden, 2I).
    xs = w.op("Unsqueeze", [x, c([1])], f"/{name}/experts/x")
    hidden = batched_experts_matmul(e, experts, "gate_up", xs, name)  # (batch, experts, seq, 2I)
    inter = int(experts.gate_up_proj.shape[1]) // 2
    gate, up = w.node("Split", [hidden, c([inter, inter])], f"/{name}/experts/split", 2, axis=-1)
    act = w.op("Mul", [gate, w.op("Sigmoid", [gate], f"/{name}/experts/Sigmoid")], f"/{name}/experts/silu")
    out = batched_experts_matmul(e, experts, "down", w.op("Mul", [act, up], f"/{name}/experts/Mul"), name)
    return weighted_sum(e, out, dense, name)


def weighted_sum(e: EmitContext, out: str, dense: str, name: str) -> str:
    """Every expert's output (batch, experts, seq, hidden) summed with the dense (batch, seq,
    experts) routing weights."""
    w, c = e.w, e.w.constant
    # weights (batch, seq, experts) -> (batch, experts, seq, 1)
    weights = w.op("Unsqueeze", [w.op("Transpose", [dense], f"/{name}/router/T", perm=[0, 2, 1]), c([3])],
                   f"/{name}/router/weights4")  # fmt: skip
    return w.op("ReduceSum", [w.op("Mul", [out, weights], f"/{name}/experts/weighted"), c([1])],
                f"/{name}/experts/sum", keepdims=0)  # fmt: skip


def batched_experts_matmul(e: EmitContext, experts: torch.nn.Module, which: str, x: str, name: str) -> str:
    """x (batch, experts, seq, in) times each expert's `which` weight (gate_up or down), transposed.

    Experts merged to a rank (LowRankExperts) are written as their two factors, two MatMuls.
    """
    w = e.w
    if hasattr(experts, f"{which}_left"):
        right = getattr(experts, f"{which}_right")  # (experts, r, in)
        left = getattr(experts, f"{which}_left")  # (experts, out, r)
        narrow = w.op("MatMul", [x, w.weight(f"{name}.experts.{which}_right", _stacked_t(e, right))],
                      f"/{name}/experts/{which}_right")  # fmt: skip
        return w.op("MatMul", [narrow, w.weight(f"{name}.experts.{which}_left", _stacked_t(e, left))],
                    f"/{name}/experts/{which}_left")  # fmt: skip
    weight = getattr(experts, f"{which}_proj")
    return w.op(
        "MatMul", [x, w.weight(f"{name}.experts.{which}_proj", _stacked_t(e, weight))], f"/{name}/experts/{which}"
    )
