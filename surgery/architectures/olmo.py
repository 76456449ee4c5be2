"""OLMo (1): Llama's layer with non-parametric LayerNorms (the mean subtracted, no gain or bias,
epsilon 1e-5 fixed in code) and optionally Q, K and V clamped to +-`clip_qkv`."""

from surgery.architectures.description import Architecture, Attention, Norms

OLMO = Architecture("olmo", "OlmoForCausalLM", norms=Norms(kind="layer", eps=1e-5),
                    attention=Attention(clip_field="clip_qkv"))  # fmt: skip
