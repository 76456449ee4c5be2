"""Mixtral: Mistral with a mixture of SwiGLU experts (softmax router, top-k renormalized)."""

from surgery.architectures.description import Architecture, Attention, Mlp

MIXTRAL = Architecture(
    "mixtral", "MixtralForCausalLM", attention=Attention(sliding="all"), mlp=Mlp(router="softmax_topk")
)
