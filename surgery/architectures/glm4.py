"""GLM-4-0414 (`glm4`): GLM's attention (biased Q/K/V, interleaved RoPE on half of each head) and
fused `gate_up_proj`, with sandwich norms: each sub-block's output is normalized too, before the
residual add."""

from surgery.architectures.description import Architecture, Attention, Mlp, Names, Norms

GLM4 = Architecture(
    "glm4",
    "Glm4ForCausalLM",
    norms=Norms(placement="sandwich"),
    attention=Attention(rope_interleaved=True),
    mlp=Mlp(gate_up="gate_up_proj"),
    names=Names(attention_post_norm="post_self_attn_layernorm", mlp_post_norm="post_mlp_layernorm"),
)
