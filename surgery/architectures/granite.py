"""Granite: Llama with embedding, residual and attention multipliers and divided logits."""

from surgery.architectures.description import Architecture, Attention, Scale

GRANITE = Architecture(
    "granite",
    "GraniteForCausalLM",
    attention=Attention(scale=Scale.field("attention_multiplier")),
    embedding_scale=Scale.field("embedding_multiplier"),
    residual_scale=Scale.field("residual_multiplier"),
    logits_divisor=Scale.field("logits_scaling"),
)
