"""GLM-4 (`glm`, GLM-4-9B): Llama's layer with biased Q/K/V projections, a fused `gate_up_proj`,
and RoPE on half of each head that turns adjacent pairs of dimensions (interleaved)."""

from surgery.architectures.description import Architecture, Attention, Mlp

GLM = Architecture("glm", "GlmForCausalLM", attention=Attention(rope_interleaved=True), mlp=Mlp(gate_up="gate_up_proj"))
