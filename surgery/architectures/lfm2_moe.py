"""LFM2-MoE: LFM2's short-convolution and attention layers, with dense SwiGLU MLPs in the first
`num_dense_layers` layers and experts after them, routed by sigmoid scores chosen with a bias."""

from surgery.architectures.description import Architecture, Attention, Convolution, Mlp, Names, Norms

LFM2_MOE = Architecture(
    "lfm2_moe",
    "Lfm2MoeForCausalLM",
    norms=Norms(eps_field="norm_eps"),
    attention=Attention(o="out_proj", qk_norm="head", q_norm="q_layernorm", k_norm="k_layernorm"),
    mlp=Mlp(gate="w1", up="w3", down="w2", router="sigmoid_biased"),
    convolution=Convolution(),
    names=Names(final_norm="embedding_norm", mlp="feed_forward", attention_pre_norm="operator_norm",
                mlp_pre_norm="ffn_norm", rotary="pos_emb"),  # fmt: skip
)
