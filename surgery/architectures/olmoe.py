"""OLMoE: RMSNorm over the whole Q and K projections, optional Q/K/V clipping, expert MLPs."""

from surgery.architectures.description import Architecture, Attention, Mlp

OLMOE = Architecture(
    "olmoe",
    "OlmoeForCausalLM",
    attention=Attention(qk_norm="projection", clip_field="clip_qkv"),
    mlp=Mlp(router="softmax_topk"),
)
