"""Gemma (1): Llama's layer with `1 + w` RMSNorm gains, GeGLU (tanh) and embeddings scaled by
sqrt(hidden); the head is tied to the embedding."""

from surgery.architectures.description import Architecture, Mlp, Norms, Scale

GEMMA = Architecture(
    "gemma",
    "GemmaForCausalLM",
    norms=Norms(offset=1.0),
    mlp=Mlp(activation="gelu_tanh"),
    embedding_scale=Scale.sqrt("hidden_size"),
)
