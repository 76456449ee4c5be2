"""Phi-3 / Phi-4: Llama with fused `qkv_proj` and `gate_up_proj`, a sliding window on every layer
when set, and the long-context scaled RoPE (`longrope`: short and long factors)."""

from surgery.architectures.description import Architecture, Attention, Mlp

PHI3 = Architecture(
    "phi3", "Phi3ForCausalLM", attention=Attention(qkv="qkv_proj", sliding="all"), mlp=Mlp(gate_up="gate_up_proj")
)
