"""Llama: pre-norm RMSNorm, grouped-query attention with RoPE, SwiGLU MLP."""

from surgery.architectures.description import Architecture

LLAMA = Architecture("llama", "LlamaForCausalLM")
