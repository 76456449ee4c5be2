"""Nemotron (3/4, Minitron): LayerNorms with a bias and a `1 + w` gain, a plain MLP without a gate
(`down(relu(up(x))^2)`, squared ReLU), RoPE on part of each head, and an untied head."""

from surgery.architectures.description import Architecture, Mlp, Norms

NEMOTRON = Architecture(
    "nemotron",
    "NemotronForCausalLM",
    norms=Norms(kind="layer", offset=1.0, eps_field="norm_eps"),
    mlp=Mlp(activation="relu2", gated=False),
)
