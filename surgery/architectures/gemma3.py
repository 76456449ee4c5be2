"""Gemma 3 (text): sandwich norms with `1 + w` gains, GeGLU (tanh), per-head Q/K norms, a query
scale from `query_pre_attn_scalar`, embeddings scaled by sqrt(hidden), and sliding-window layers
with their own RoPE base (5 local : 1 global in the released models)."""

from surgery.architectures.description import Architecture, Attention, Mlp, Names, Norms, Scale

GEMMA3 = Architecture(
    "gemma3_text",
    "Gemma3ForCausalLM",
    norms=Norms(placement="sandwich", offset=1.0),
    attention=Attention(qk_norm="head", scale=Scale.rsqrt("query_pre_attn_scalar"), rope_per_layer_type=True),
    mlp=Mlp(activation="gelu_tanh"),
    names=Names(mlp_pre_norm="pre_feedforward_layernorm"),
    embedding_scale=Scale.sqrt("hidden_size"),
    final_softcap_field="final_logit_softcapping",
    activation_field="hidden_activation",
    requires={"use_bidirectional_attention": (False, None)},
)
