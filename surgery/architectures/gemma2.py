"""Gemma 2: Gemma 3's sandwich norms with `1 + w` gains, GeGLU (tanh), embeddings scaled by
sqrt(hidden) and the query scale from `query_pre_attn_scalar`, without Q/K norms; instead the
attention scores and the final logits are soft-capped (tanh), and local (sliding-window) and
global layers alternate with one RoPE base."""

from surgery.architectures.description import Architecture, Attention, Mlp, Names, Norms, Scale

GEMMA2 = Architecture(
    "gemma2",
    "Gemma2ForCausalLM",
    norms=Norms(placement="sandwich", offset=1.0),
    attention=Attention(scale=Scale.rsqrt("query_pre_attn_scalar"), softcap_field="attn_logit_softcapping"),
    mlp=Mlp(activation="gelu_tanh"),
    names=Names(mlp_pre_norm="pre_feedforward_layernorm"),
    embedding_scale=Scale.sqrt("hidden_size"),
    final_softcap_field="final_logit_softcapping",
    activation_field="hidden_activation",
)
