"""Qwen3-MoE: Qwen3 (per-head Q/K norms) with expert MLPs."""

from surgery.architectures.description import Architecture, Attention, Mlp

QWEN3_MOE = Architecture(
    "qwen3_moe", "Qwen3MoeForCausalLM", attention=Attention(qk_norm="head"), mlp=Mlp(router="softmax_topk")
)
