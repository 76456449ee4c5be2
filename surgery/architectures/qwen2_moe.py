"""Qwen2-MoE: Qwen2 with expert MLPs plus a sigmoid-gated shared expert (dense layers allowed)."""

from surgery.architectures.description import Architecture, Mlp

QWEN2_MOE = Architecture("qwen2_moe", "Qwen2MoeForCausalLM", mlp=Mlp(router="softmax_topk"))
