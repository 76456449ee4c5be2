"""HunYuan dense (Hunyuan-1.8B/4B/7B): Llama's layer with per-head Q/K RMSNorms applied after RoPE,
not before (so rotations no longer cancel between positions, and left-padded rows need their
true positions), and RoPE whose base is stretched by a fixed NTK `alpha`."""

from surgery.architectures.description import Architecture, Attention

HUNYUAN_V1_DENSE = Architecture(
    "hunyuan_v1_dense",
    "HunYuanDenseV1ForCausalLM",
    attention=Attention(qk_norm="head", q_norm="query_layernorm", k_norm="key_layernorm", qk_norm_after_rope=True),
)
