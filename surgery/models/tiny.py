"""The tiny built-in models: seeded random decoders of every family, and their byte tokenizer.

They are random but seeded, so every run and every machine sees the same weights. They exist
for structural tests across architectures and need no download; `surgery.models.builtin`
names them beside the real built-ins.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TinyModel:
    """A seeded random decoder: an architecture and the config fields that make it small."""

    architecture: str
    overrides: dict[str, Any]
    seed: int = 0
    # Give norm gains and biases seeded random values instead of their constant initialization, so
    # that parity tests see whether a gain is applied as `w` or `1 + w` (Gemma stores zeros) and
    # whether a bias is applied at all (zeros at initialization).
    random_norms: bool = False


_TINY_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    # Larger than the usual 0.02 so random layers change the residual stream visibly and
    # parity tests compare logits that actually depend on every layer.
    "initializer_range": 0.08,
}

def _longrope(**rope: Any) -> dict[str, Any]:
    """Phi-3's longrope over a 32-position original context (256 in all): short factors below 32
    positions, long ones past it; `rope` adds fields to the RoPE parameters."""
    return {
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 32,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.0 + 0.5 * i for i in range(8)],
            **rope,
        },
    }


# GLM's attention: two 32-wide heads (RoPE on half of each, interleaved), biased Q/K/V.
_GLM_ATTENTION: dict[str, Any] = {
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "attention_bias": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}

TINY_MODELS: dict[str, TinyModel] = {
    "tiny-llama": TinyModel("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "tiny-mistral": TinyModel(
        "mistral",
        # A short window so tests exercise sliding-window attention, not just full attention.
        {"sliding_window": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=1,
    ),
    "tiny-qwen2": TinyModel("qwen2", {"tie_word_embeddings": True}, seed=2),
    "tiny-qwen3": TinyModel("qwen3", {}, seed=3),
    # Mixture-of-experts: 4 experts, 2 per token, so batches route tokens to different experts.
    "tiny-mixtral": TinyModel(
        "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48}, 4
    ),
    "tiny-qwen2-moe": TinyModel(
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 96,
            "decoder_sparse_step": 1,
            "norm_topk_prob": False,
        },
        5,
    ),
    "tiny-qwen3-moe": TinyModel(
        "qwen3_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
        },
        6,
    ),  # fmt: skip
    # clip_qkv is small enough that clipping happens (after the Q/K norms values are ~1).
    "tiny-olmoe": TinyModel(
        "olmoe",
        {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48, "norm_topk_prob": False, "clip_qkv": 0.5},
        7,
    ),
    # Gemma 3: sandwich norms with 1 + w gains, GeGLU, a sliding window of 8 on 2 of 3 layers with
    # its own RoPE base, and a query scale that is not 1/sqrt(head_dim).
    "tiny-gemma3": TinyModel(
        "gemma3_text",
        {
            "tie_word_embeddings": True,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
            "query_pre_attn_scalar": 24,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
        seed=8,
        random_norms=True,
    ),
    # Gemma 2: soft-capped attention scores and logits (caps small enough to bite), a sliding
    # window of 8 on every other layer.
    "tiny-gemma2": TinyModel(
        "gemma2",
        {
            "tie_word_embeddings": True,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"] * 3,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 5.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        seed=13,
        random_norms=True,
    ),
    # Phi-3: fused qkv_proj and gate_up_proj; longrope with a 32-position original context, so
    # verification's prompts run on the long factors and short prompts on the short ones.
    "tiny-phi3": TinyModel(
        "phi3",
        _longrope(),
        seed=9,
        random_norms=True,
    ),
    # Phi-4-mini: Phi-3 whose RoPE rotates only part of each head (0.75 of 128 there; half of
    # 32 here, the least onnxruntime's GroupQueryAttention takes: a multiple of 16 dimensions).
    "tiny-phi4-mini": TinyModel(
        "phi3",
        {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
         "partial_rotary_factor": 0.5, **_longrope(partial_rotary_factor=0.5)},
        seed=12,
        random_norms=True,
    ),
    # OLMo: non-parametric LayerNorms and Q/K/V clamped (small enough to bite).
    "tiny-olmo": TinyModel(
        "olmo", {"clip_qkv": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, seed=15
    ),
    # SmolLM3: every fourth layer without RoPE (NoPE), here layers 1 and 3 of 6 as well, so
    # dropping around them keeps both kinds.
    "tiny-smollm3": TinyModel(
        "smollm3",
        {"no_rope_layers": [1, 0, 1, 0, 1, 1], "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
         "use_sliding_window": False},
        seed=14,
        random_norms=True,
    ),
    # Gemma (1): 1 + w gains, GeGLU, the embedding scaled by sqrt(hidden), a tied head.
    "tiny-gemma": TinyModel(
        "gemma",
        {"tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh",
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=16,
        random_norms=True,
    ),
    # GLM-4 (glm): biased Q/K/V, fused gate_up_proj, interleaved RoPE on half of each 32-wide head.
    "tiny-glm": TinyModel("glm", _GLM_ATTENTION, seed=17, random_norms=True),
    # GLM-4-0414 (glm4): GLM's attention with each sub-block's output normalized too.
    "tiny-glm4": TinyModel("glm4", _GLM_ATTENTION, seed=18, random_norms=True),
    # ERNIE 4.5: interleaved RoPE on whole heads, biases on every projection, a tied head.
    "tiny-ernie4_5": TinyModel(
        "ernie4_5",
        {"use_bias": True, "tie_word_embeddings": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=19,
        random_norms=True,
    ),
    # Nemotron: LayerNorms with biases and 1 + w gains, a squared-ReLU MLP without a gate, RoPE on
    # half of each 32-wide head.
    "tiny-nemotron": TinyModel(
        "nemotron",
        {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "hidden_act": "relu2",
         "norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.5}},
        seed=20,
        random_norms=True,
    ),
    # HunYuan dense: per-head Q/K norms after RoPE, and RoPE stretched by a fixed NTK alpha.
    "tiny-hunyuan": TinyModel(
        "hunyuan_v1_dense",
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0}},
        seed=21,
        random_norms=True,
    ),
    # gpt-oss: attention sinks, biases everywhere, sliding (8) and full layers alternating, and 4
    # experts (2 per token) with a clamped SwiGLU whose limit bites; widths that MXFP4's blocks of
    # 32 divide, for its checkpoint format.
    "tiny-gpt-oss": TinyModel(
        "gpt_oss",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64, "sliding_window": 8,
         "layer_types": ["sliding_attention", "full_attention"] * 3, "attention_bias": True, "swiglu_limit": 0.5,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=22,
        random_norms=True,
    ),
    # DeepSeek-V2-Lite's attention: multi-head latent attention (latent 32 + rotary key 16: a cache
    # head of 48), a full-rank query, dense MLPs only.
    "tiny-deepseek-v2": TinyModel(
        "deepseek_v2",
        {"kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
         "head_dim": 16, "num_key_value_heads": 4, "first_k_dense_replace": 6, "n_routed_experts": 4,
         "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=23,
        random_norms=True,
    ),
    # DeepSeek-V2-Lite's whole layout: a low-rank query here too, one dense layer, then 4 experts (2
    # per token, weights scaled by 2.5, not renormalized) beside a shared expert.
    "tiny-deepseek-v2-moe": TinyModel(
        "deepseek_v2",
        {"kv_lora_rank": 32, "q_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
         "head_dim": 16, "num_key_value_heads": 4, "first_k_dense_replace": 1, "n_routed_experts": 4,
         "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
         "norm_topk_prob": False, "topk_method": "greedy",
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=24,
        random_norms=True,
    ),
    # Phi-MoE: LayerNorms with biases, biased attention and head, 4 experts routed two per token by
    # SparseMixer (a jitter wide enough that its "near the best" softmax holds several experts).
    "tiny-phimoe": TinyModel(
        "phimoe",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48, "router_jitter_noise": 0.3,
         "attention_bias": True, "lm_head_bias": True, "rms_norm_eps": 1e-5, "sliding_window": None,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=25,
        random_norms=True,
    ),
    # Granite: Llama with multipliers that are far from 1, so a missing one shows.
    "tiny-granite": TinyModel(
        "granite",
        {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.05,
            "logits_scaling": 8.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        seed=10,
        random_norms=True,
    ),
    # LFM2: gated short convolutions (window 3, biased projections) in layers 0, 2 and 5, attention
    # with per-head Q/K norms in the others (the tests drop attention in 1 and 4), a tied head, and
    # the MLP width LFM2 derives from its config (240 -> 2/3 of it, rounded up to a multiple of 32: 160).
    "tiny-lfm2": TinyModel(
        "lfm2",
        {
            "layer_types": ["conv", "full_attention", "conv", "full_attention", "full_attention", "conv"],
            "conv_L_cache": 3,
            "conv_bias": True,
            "intermediate_size": 240,
            "block_multiple_of": 32,
            "norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        seed=26,
        random_norms=True,
    ),
    # LFM2-MoE: tiny-lfm2's layers with a dense MLP in layer 0 and 4 experts (2 per token) after
    # it, routed by sigmoid scores chosen with a random selection bias, scaled by 2.
    "tiny-lfm2-moe": TinyModel(
        "lfm2_moe",
        {"layer_types": ["conv", "full_attention", "conv", "full_attention", "full_attention", "conv"],
         "conv_L_cache": 3, "num_dense_layers": 1, "num_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 32, "routed_scaling_factor": 2.0, "norm_eps": 1e-5, "tie_word_embeddings": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=27,
        random_norms=True,
    ),
    # OLMo 2: norms after the sub-blocks, Q/K norms over the whole projections.
    "tiny-olmo2": TinyModel(
        "olmo2", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, seed=11, random_norms=True
    ),
}
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "phimoe", "lfm2_moe")


def byte_tokenizer_vocab_size() -> int:
    """Vocabulary of the tiny models' tokenizer: 256 bytes plus <s>, </s>, <pad>."""
    return 259


def tiny_config(name: str) -> Any:
    """The transformers config of a tiny built-in model."""
    from transformers import AutoConfig

    spec = TINY_MODELS[name]
    # A copy: a config's nested dicts (rope_parameters) are its own, so a change to one config
    # never reaches the next one built.
    fields = copy.deepcopy({**_TINY_COMMON, **spec.overrides})
    fields.update(vocab_size=byte_tokenizer_vocab_size(), bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if spec.architecture in ("qwen2", "qwen3"):
        fields.setdefault("use_sliding_window", False)
    return AutoConfig.for_model(spec.architecture, **fields)


def tiny_model(name: str) -> Any:
    """A tiny built-in model with seeded random weights, in fp32 with eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_MODELS[name].seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        if TINY_MODELS[name].random_norms:
            with torch.no_grad():
                for parameter_name, parameter in model.named_parameters():
                    if parameter_name.endswith("bias"):  # initialized to zeros: unseen
                        parameter.copy_(0.1 * torch.randn_like(parameter))
                    elif parameter_name.endswith(".sinks"):  # large enough to take a visible share
                        parameter.copy_(torch.randn_like(parameter))
                    elif parameter.dim() == 1 and "norm" in parameter_name:
                        parameter.copy_(0.5 * torch.rand_like(parameter) + 0.75)
                for buffer_name, buffer in model.named_buffers():
                    if buffer_name.endswith("expert_bias"):  # a selection bias (LFM2-MoE): zeros would pick nothing
                        buffer.copy_(0.3 * torch.randn_like(buffer))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (no merges) for the tiny models: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for token in ("<s>", "</s>", "<pad>"):
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
