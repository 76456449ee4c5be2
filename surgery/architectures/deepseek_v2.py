"""DeepSeek-V2 (and -Lite): multi-head latent attention, whose cache is one compressed latent and
one shared rotary key per token (interleaved RoPE on it, the query scale with YaRN's factor), a
low-rank query in the full model; dense SwiGLU MLPs in the first `first_k_dense_replace` layers,
then experts: softmax top-k (greedy), the weights scaled, shared experts on every token."""

from surgery.architectures.description import Architecture, Attention, Mlp

DEEPSEEK_V2 = Architecture(
    "deepseek_v2",
    "DeepseekV2ForCausalLM",
    attention=Attention(latent=True),
    mlp=Mlp(router="softmax_topk_scaled"),
    requires={"topk_method": ("greedy",)},  # DeepSeek-V2's group-limited routing is not modelled
)
