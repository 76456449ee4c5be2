"""ERNIE 4.5 (dense): Llama's layer whose RoPE turns adjacent pairs of dimensions (interleaved,
in fp32), with optional biases on every projection (`use_bias`) and a tied head."""

from surgery.architectures.description import Architecture, Attention

ERNIE4_5 = Architecture("ernie4_5", "Ernie4_5ForCausalLM", attention=Attention(rope_interleaved=True))
