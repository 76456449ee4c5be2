"""Build the typed nodes of a decoder from its architecture description and Hugging Face model.

Every node holds references to the model's own parameters (views for fused projections), so
building copies no weights. The description's names locate the modules; its details (norm
offset and placement, Q/K norms, scales, windows, RoPE kinds) become node settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from surgery.architectures.description import Architecture, DescriptionError
from surgery.nodes.attention import NO_ROPE, Attention
from surgery.nodes.embedding import Embedding
from surgery.nodes.head import Head
from surgery.nodes.latent_attention import LatentAttention
from surgery.nodes.linear import linear_view
from surgery.nodes.mlp import DenseMLP, GatedMLP
from surgery.nodes.moe import MixtureOfExperts, is_moe
from surgery.nodes.moe_clamped import ClampedSwiGLUMoE
from surgery.nodes.moe_sigmoid import SigmoidRoutedMoE
from surgery.nodes.moe_sparse_mixer import SparseMixerMoE
from surgery.nodes.norm import LayerNorm, RMSNorm
from surgery.nodes.rotary import Rotary
from surgery.nodes.short_conv import ShortConv


@dataclass
class BuiltLayer:
    """The nodes of one layer, before any pass."""

    attention: Attention | ShortConv  # a short convolution in the attention's place (LFM2's conv layers)
    mlp: torch.nn.Module
    attention_norm: RMSNorm | None
    attention_post_norm: RMSNorm | None
    mlp_norm: RMSNorm | None
    mlp_post_norm: RMSNorm | None
    residual_scale: float


@dataclass
class BuiltModel:
    """Embedding, layers, head and rotary tables of a model, as nodes."""

    embedding: Embedding
    layers: list[BuiltLayer]
    head: Head
    rotary: Rotary


def _part(parent: Any, name: str, path: str, arch: Architecture) -> Any:
    """The sub-module `name` of `parent` (at `path`), or a DescriptionError naming what is missing."""
    module = getattr(parent, name, None)
    if module is None:
        where = f"{path}.{name}" if path != "model" else name
        raise DescriptionError(f"the '{arch.model_type}' description names '{where}', which the model does not have")
    return module


def _norm(arch: Architecture, config: Any, module: torch.nn.Module) -> RMSNorm | LayerNorm:
    eps = arch.norms.eps or getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
    if eps is None:
        eps = getattr(config, arch.norms.eps_field, 1e-6)
    if arch.norms.kind == "layer":
        return LayerNorm(getattr(module, "weight", None), float(eps), int(config.hidden_size), arch.norms.offset,
                         getattr(module, "bias", None))  # fmt: skip
    return RMSNorm(module.weight, float(eps), arch.norms.offset)


def _latent_attention(arch: Architecture, config: Any, module: torch.nn.Module, path: str) -> LatentAttention:
    """Multi-head latent attention from DeepSeek's module names; the query scale is the module's own
    (DeepSeek folds YaRN's attention factor into it)."""
    low_rank_query = getattr(config, "q_lora_rank", None) is not None
    return LatentAttention(
        None if low_rank_query else _part(module, "q_proj", path, arch),
        _part(module, "q_a_proj", path, arch) if low_rank_query else None,
        _norm(arch, config, _part(module, "q_a_layernorm", path, arch)) if low_rank_query else None,
        _part(module, "q_b_proj", path, arch) if low_rank_query else None,
        _part(module, "kv_a_proj_with_mqa", path, arch),
        _norm(arch, config, _part(module, "kv_a_layernorm", path, arch)),
        _part(module, "kv_b_proj", path, arch),
        _part(module, arch.attention.o, path, arch),
        num_heads=int(config.num_attention_heads),
        nope=int(config.qk_nope_head_dim),
        rope_dim=int(config.qk_rope_head_dim),
        value_dim=int(config.v_head_dim),
        rank=int(config.kv_lora_rank),
        scaling=float(module.scaling),
    )


def _attention(arch: Architecture, config: Any, module: torch.nn.Module, index: int, sliding: bool) -> Attention:
    spec = arch.attention
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    path = f"{arch.names.body}.{arch.names.layers}.{index}.{arch.names.attention}"
    if spec.latent:
        return _latent_attention(arch, config, module, path)
    if spec.qkv is not None:
        fused = _part(module, spec.qkv, path, arch)
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        weights = fused.weight.split([q_size, kv_size, kv_size], dim=0)
        biases = fused.bias.split([q_size, kv_size, kv_size]) if fused.bias is not None else (None,) * 3
        q, k, v = (linear_view(w, b) for w, b in zip(weights, biases, strict=True))
    else:
        q, k, v = (_part(module, name, path, arch) for name in (spec.q, spec.k, spec.v))
    q_norm = k_norm = None
    if spec.qk_norm != "none":
        q_norm = _norm(arch, config, _part(module, spec.q_norm, path, arch))
        k_norm = _norm(arch, config, _part(module, spec.k_norm, path, arch))
    softcap = getattr(config, spec.softcap_field, None) if spec.softcap_field else None
    clip = getattr(config, spec.clip_field, None) if spec.clip_field else None
    return Attention(
        q, k, v, _part(module, spec.o, path, arch),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        scaling=spec.scale.value(config, head_dim**-0.5),
        qk_norm=spec.qk_norm,
        q_norm=q_norm,
        k_norm=k_norm,
        softcap=float(softcap) if softcap is not None else None,
        clip=float(clip) if clip is not None else None,
        sliding_window=int(config.sliding_window) if sliding else None,
        rope=_rope_kind(spec, config, index),
        rope_interleaved=spec.rope_interleaved,
        qk_norm_after_rope=spec.qk_norm_after_rope,
        sinks=_part(module, spec.sinks, path, arch) if spec.sinks else None,
    )  # fmt: skip


def _short_conv(arch: Architecture, hf_layer: torch.nn.Module, layer_path: str) -> ShortConv:
    module = _part(hf_layer, arch.convolution.module, layer_path, arch)
    path = f"{layer_path}.{arch.convolution.module}"
    return ShortConv(*(_part(module, name, path, arch) for name in ("in_proj", "conv", "out_proj")))


def _operator(arch: Architecture, config: Any, hf_layer: torch.nn.Module, layer_path: str, index: int,
              sliding: bool, conv: bool) -> Attention | ShortConv:  # fmt: skip
    """The layer's token mixer: its attention, or its short convolution (LFM2's conv layers)."""
    if conv:
        return _short_conv(arch, hf_layer, layer_path)
    return _attention(arch, config, _part(hf_layer, arch.names.attention, layer_path, arch), index, sliding)


def _rope_kind(spec, config: Any, index: int) -> str | None:
    """Which rotary table a layer reads: its layer type's (Gemma 3), none (a NoPE layer), or the model's."""
    if spec.rope_layers_field is not None and not getattr(config, spec.rope_layers_field)[index]:
        return NO_ROPE
    return config.layer_types[index] if spec.rope_per_layer_type else None


def _mlp(arch: Architecture, module: torch.nn.Module, path: str) -> torch.nn.Module:
    if arch.mlp.router == "sparsemixer":
        return SparseMixerMoE(module)  # Phi-MoE: two experts picked one after the other
    if arch.mlp.router == "sigmoid_biased" and is_moe(module):
        return SigmoidRoutedMoE(module)  # LFM2-MoE: sigmoid scores, experts chosen with a bias
    if arch.mlp.router == "topk_softmax_clamped":
        return ClampedSwiGLUMoE(module)  # gpt-oss: biased router and experts, clamped SwiGLU
    if is_moe(module):
        return MixtureOfExperts(module)  # transformers' block runs itself; the node emits it
    spec = arch.mlp
    if not spec.gated:
        return DenseMLP(_part(module, spec.up, path, arch), _part(module, spec.down, path, arch), spec.activation)
    if spec.gate_up is not None:
        fused = _part(module, spec.gate_up, path, arch).weight
        gate_w, up_w = fused.chunk(2, dim=0)  # gate rows first, as transformers splits it
        gate, up = linear_view(gate_w), linear_view(up_w)
    else:
        gate, up = _part(module, spec.gate, path, arch), _part(module, spec.up, path, arch)
    return GatedMLP(gate, up, _part(module, spec.down, path, arch), spec.activation)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two parameters are one (a tied head). Meta tensors (lazily loaded) have no data
    pointer to compare: transformers ties by sharing the Parameter object itself."""
    if a is b:
        return True
    if a.device.type == "meta" or b.device.type == "meta":
        return False
    return a.data_ptr() == b.data_ptr()


def build(arch: Architecture, model: Any) -> BuiltModel:
    """The nodes of `model` as `arch` describes it (references to its tensors)."""
    config = model.config
    names = arch.names
    body = _part(model, names.body, "model", arch)
    windows = arch.sliding_layers(config)
    convs = arch.conv_layers(config)
    placement = arch.norms.placement
    residual_scale = arch.residual_scale.value(config)
    layers = []
    for i, hf_layer in enumerate(_part(body, names.layers, names.body, arch)):
        layer_path = f"{names.body}.{names.layers}.{i}"

        def norm(role: str, hf_layer=hf_layer, layer_path=layer_path) -> RMSNorm | None:
            wanted = {"pre": ("attention_pre_norm", "mlp_pre_norm"),
                      "post": ("attention_post_norm", "mlp_post_norm")}  # fmt: skip
            if placement != "sandwich" and role not in wanted[placement]:
                return None
            return _norm(arch, config, _part(hf_layer, getattr(names, role), layer_path, arch))

        layers.append(
            BuiltLayer(
                attention=_operator(arch, config, hf_layer, layer_path, i, windows[i], convs[i]),
                mlp=_mlp(arch, _part(hf_layer, names.mlp, layer_path, arch), f"{layer_path}.{names.mlp}"),
                attention_norm=norm("attention_pre_norm"),
                attention_post_norm=norm("attention_post_norm"),
                mlp_norm=norm("mlp_pre_norm"),
                mlp_post_norm=norm("mlp_post_norm"),
                residual_scale=residual_scale,
            )
        )
    embed = _part(body, names.embed, names.body, arch)
    head_module = _part(model, names.head, "model", arch)
    softcap = getattr(config, arch.final_softcap_field, None) if arch.final_softcap_field else None
    head = Head(
        _norm(arch, config, _part(body, names.final_norm, names.body, arch)),
        head_module.weight,
        divisor=arch.logits_divisor.value(config),
        softcap=float(softcap) if softcap is not None else None,
        tied=_same_tensor(head_module.weight, embed.weight),
        bias=getattr(head_module, "bias", None),
    )
    embedding = Embedding(embed.weight, arch.embedding_scale.value(config))
    rotary = Rotary(_part(body, names.rotary, names.body, arch), arch.attention.rope_per_layer_type, config,
                    once=arch.attention.rope_tables_once)  # fmt: skip
    return BuiltModel(embedding, layers, head, rotary)
