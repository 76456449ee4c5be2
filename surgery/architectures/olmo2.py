"""OLMo 2: norms after each sub-block (none before), RMSNorm over the whole Q and K projections."""

from surgery.architectures.description import Architecture, Attention, Norms

OLMO2 = Architecture(
    "olmo2", "Olmo2ForCausalLM", norms=Norms(placement="post"), attention=Attention(qk_norm="projection")
)
