"""gpt-oss: attention with biases and a learned sink logit per head (GroupQueryAttention's
`head_sink`), sliding-window and full layers alternating, YaRN RoPE whose module returns each
frequency once, and a mixture of experts with a biased router (softmax over the top k) and
biased experts whose SwiGLU is clamped."""

from surgery.architectures.description import Architecture, Attention, Mlp

GPT_OSS = Architecture(
    "gpt_oss",
    "GptOssForCausalLM",
    attention=Attention(sinks="sinks", rope_tables_once=True),
    mlp=Mlp(router="topk_softmax_clamped"),
)
