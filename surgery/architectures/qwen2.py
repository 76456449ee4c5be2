"""Qwen2: Llama with biases on Q, K and V (read from the weights) and optional sliding layers."""

from surgery.architectures.description import Architecture

QWEN2 = Architecture("qwen2", "Qwen2ForCausalLM")
