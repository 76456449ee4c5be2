"""Mistral: Llama with a sliding window on every layer when the config sets one."""

from surgery.architectures.description import Architecture, Attention

MISTRAL = Architecture("mistral", "MistralForCausalLM", attention=Attention(sliding="all"))
