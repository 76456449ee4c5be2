"""SmolLM3: Llama's layer, except that every fourth layer has no position embedding at all
(NoPE: `no_rope_layers[i]` is 0), which long-context models use to generalise past their
training length."""

from surgery.architectures.description import Architecture, Attention

SMOLLM3 = Architecture("smollm3", "SmolLM3ForCausalLM", attention=Attention(rope_layers_field="no_rope_layers"))
