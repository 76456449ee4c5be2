"""Qwen3: Llama with an RMSNorm over each head of Q and K."""

from surgery.architectures.description import Architecture, Attention

QWEN3 = Architecture("qwen3", "Qwen3ForCausalLM", attention=Attention(qk_norm="head"))
