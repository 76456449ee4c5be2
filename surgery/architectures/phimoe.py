"""Phi-MoE (Phi-3.5-MoE): Phi-3's attention (separate, biased Q/K/V here; longrope; a window on
every layer when set) with LayerNorms (gain and bias) instead of RMSNorms, a biased head, and
16 SwiGLU experts routed two per token by SparseMixer."""

from surgery.architectures.description import Architecture, Attention, Mlp, Norms

PHIMOE = Architecture(
    "phimoe",
    "PhimoeForCausalLM",
    norms=Norms(kind="layer"),
    attention=Attention(sliding="all"),
    mlp=Mlp(router="sparsemixer"),
    requires={"num_experts_per_tok": (2,)},  # SparseMixer picks exactly two
)
