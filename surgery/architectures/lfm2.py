"""LFM2: most layers mix tokens with a gated short convolution instead of attention (their cache
is a fixed convolution state); the rest are attention with per-head Q/K norms. SwiGLU MLPs named
w1/w3/w2, and the final norm is called `embedding_norm`."""

from surgery.architectures.description import Architecture, Attention, Convolution, Mlp, Names, Norms

LFM2 = Architecture(
    "lfm2",
    "Lfm2ForCausalLM",
    norms=Norms(eps_field="norm_eps"),
    attention=Attention(o="out_proj", qk_norm="head", q_norm="q_layernorm", k_norm="k_layernorm"),
    mlp=Mlp(gate="w1", up="w3", down="w2"),
    convolution=Convolution(),
    names=Names(
        final_norm="embedding_norm", mlp="feed_forward", attention_pre_norm="operator_norm", mlp_pre_norm="ffn_norm"
    ),  # fmt: skip
)
