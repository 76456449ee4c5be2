"""The model index: what the checker knows about a model, read from its config alone.

No weights are loaded to build it, so `surgery check` and `surgery plan` are fast even for
large models. Module paths follow the Hugging Face layout of Llama-family decoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgery.architectures import lookup, unknown_architecture
from surgery.formats.names import ATTENTION_LINEARS, CONV_LINEARS, MLP_LINEARS, layer_linear

# RoPE variants whose cos/sin tables do not depend on the sequence length, so they can be
# precomputed into the graph ("longrope" has two tables, picked by the total length).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "ntk_alpha")
# What each description activation accepts as the config's activation name.
ACTIVATION_NAMES = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh",), "relu2": ("relu2",)}
MAX_LAYERS = 4096  # far beyond any released decoder; a larger count is a damaged config


@dataclass(frozen=True)
class ModelIndex:
    """Structural facts of a decoder-only model, enough to check and plan a recipe."""

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    hidden_act: str
    rope_type: str
    sliding_window: int | None
    layer_sliding: tuple[bool, ...]
    max_positions: int = 2048
    num_experts: int = 0  # 0 = dense MLPs
    experts_per_token: int = 0
    expert_intermediate_size: int = 0  # neurons of one expert (MoE models)
    partial_rotary: float = 1.0  # fraction of each head RoPE rotates
    mlp_activation: str = "silu"  # the description's MLP activation: silu (SwiGLU), gelu_tanh (GeGLU), relu2
    mlp_gated: bool = True  # whether the dense MLP has a gate projection (Nemotron's has none)
    moe_router: str = "none"  # the description's router: softmax_topk, topk_softmax_clamped (gpt-oss)
    latent_attention: bool = False  # multi-head latent attention (DeepSeek): one latent KV head of head_dim
    final_logit_softcap: float | None = None  # tanh soft-capping of the logits, where the family has it
    conv_layers: tuple[int, ...] = ()  # layers with a short convolution in the attention's place (LFM2)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers that have attention (every layer but a convolution layer)."""
        convs = set(self.conv_layers)
        return tuple(i for i in range(self.num_layers) if i not in convs)

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.num_experts > 0

    @classmethod
    def from_config(cls, name: str, config: Any) -> ModelIndex:
        """Build the index from a transformers config object."""
        num_heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        layers = int(config.num_hidden_layers)
        rope_type = _rope_type(config)
        window = getattr(config, "sliding_window", None)
        architecture = lookup(str(config.model_type))
        softcap = None
        if architecture is not None:
            sliding = tuple(architecture.sliding_layers(config))
            activation = getattr(config, architecture.activation_field, None)
            mlp_activation = architecture.mlp.activation
            mlp_gated = architecture.mlp.gated
            moe_router = architecture.mlp.router
            convs = tuple(i for i, conv in enumerate(architecture.conv_layers(config)) if conv)
            if architecture.final_softcap_field:
                softcap = getattr(config, architecture.final_softcap_field, None)
        else:
            sliding = tuple(False for _ in range(layers))
            activation = getattr(config, "hidden_act", None)
            mlp_activation = "silu"
            mlp_gated = True
            moe_router = "none"
            convs = ()
        if not any(sliding):
            window = None
        kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        partial_rotary = float(_rope_field(config, "partial_rotary_factor") or 1.0)
        latent = architecture is not None and architecture.attention.latent
        if latent:  # the cache's one head: the latent and the shared rotary key (nodes/latent_attention.py)
            head_dim = int(config.kv_lora_rank) + int(config.qk_rope_head_dim)
            kv_heads, partial_rotary = 1, int(config.qk_rope_head_dim) / head_dim
        return cls(
            name=name,
            architecture=str(config.model_type),
            num_layers=layers,
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            intermediate_size=_intermediate_size(config),
            vocab_size=int(config.vocab_size),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            hidden_act=str(activation or "silu"),
            partial_rotary=partial_rotary,
            latent_attention=latent,
            mlp_activation=mlp_activation,
            mlp_gated=mlp_gated,
            moe_router=moe_router,
            final_logit_softcap=float(softcap) if softcap is not None else None,
            conv_layers=convs,
            rope_type=rope_type,
            sliding_window=int(window) if window is not None else None,
            layer_sliding=sliding,
            max_positions=int(getattr(config, "max_position_embeddings", 2048) or 2048),
            num_experts=0 if _dense_layers(config) >= layers
            else int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0),
            experts_per_token=int(getattr(config, "num_experts_per_tok", 0) or 0),
            expert_intermediate_size=int(
                getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 0) or 0
            ),
        )

    def implausible_fields(self) -> list[str]:
        """Config values no real model has (a corrupt or hand-edited config.json)."""
        bounds = {
            "num_hidden_layers": (self.num_layers, 1, MAX_LAYERS),
            "hidden_size": (self.hidden_size, 1, 1 << 20),
            "num_attention_heads": (self.num_heads, 1, 1 << 14),
            "num_key_value_heads": (self.num_kv_heads, 1, 1 << 14),
            "head_dim": (self.head_dim, 1, 1 << 14),
            "intermediate_size": (self.intermediate_size, 1, 1 << 22),
            "vocab_size": (self.vocab_size, 1, 1 << 24),
            "max_position_embeddings": (self.max_positions, 2, 1 << 24),
            "num_experts": (self.num_experts, 0, 1 << 14),
        }
        problems = [
            f"config.json: {name} {value} is outside {low}..{high}"
            for name, (value, low, high) in bounds.items()
            if not low <= value <= high
        ]
        if not problems and self.num_heads % self.num_kv_heads:
            problems.append(
                f"config.json: {self.num_heads} attention heads cannot share {self.num_kv_heads} key/value heads evenly"
            )
        if len(self.layer_sliding) != self.num_layers:
            entries = len(self.layer_sliding)
            problems.append(f"config.json: layer_types has {entries} entries for {self.num_layers} layers")
        return problems

    def layer_path(self, layer: int) -> str:
        """Module path of decoder layer `layer` (an original layer number)."""
        return f"model.layers.{layer}"

    def part_path(self, layer: int, part: str) -> str:
        """Module path of a layer's `attention`, `mlp` or whole `block`."""
        suffix = {"attention": ".self_attn", "mlp": ".mlp", "block": ""}[part]
        return self.layer_path(layer) + suffix

    def linear_names(self, layer: int, part: str) -> list[str]:
        """The exported linear layers (MatMul weights) of a layer's `attention`, `mlp` or both (`layers`).

        Q, K and V are exported as one packed `qkv_proj`, so attention has two linears.
        """
        kinds = CONV_LINEARS if layer in self.conv_layers else ATTENTION_LINEARS
        attention = [layer_linear(layer, kind) for kind in kinds]
        mlp = [layer_linear(layer, kind) for kind in MLP_LINEARS if self.mlp_gated or kind != "gate_proj"]
        return {"attention": attention, "mlp": mlp, "layers": attention + mlp}[part]

    def unsupported_reasons(self) -> list[str]:
        """Why this model cannot be compiled (empty when it can)."""
        reasons = self.implausible_fields()
        if reasons:
            return reasons
        architecture = lookup(self.architecture)
        if architecture is None:
            return [unknown_architecture(self.architecture)]
        if self.hidden_act not in ACTIVATION_NAMES[architecture.mlp.activation]:
            wanted = ", ".join(ACTIVATION_NAMES[architecture.mlp.activation])
            reasons.append(
                f"activation '{self.hidden_act}' is not supported for {self.architecture} (expected {wanted})"
            )
        rotated = round(self.head_dim * self.partial_rotary)
        if rotated % 16:  # GroupQueryAttention's cos/sin tables: a multiple of 8 wide (half the rotated dims)
            reasons.append(
                f"RoPE rotates {rotated} of {self.head_dim} dimensions per head (partial_rotary_factor "
                f"{self.partial_rotary:g}); onnxruntime's GroupQueryAttention needs a multiple of 16"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            reasons.append(
                f"RoPE type '{self.rope_type}' is not supported; supported: " + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        if self.head_dim % 16:
            reasons.append(
                f"head_dim {self.head_dim} is not a multiple of 16, which onnxruntime's GroupQueryAttention requires"
            )
        return reasons


def _dense_layers(config: Any) -> int:
    """How many leading layers of a mixture-of-experts model keep a dense MLP (DeepSeek's
    `first_k_dense_replace`, LFM2-MoE's `num_dense_layers`)."""
    return int(getattr(config, "first_k_dense_replace", 0) or getattr(config, "num_dense_layers", 0) or 0)


def _intermediate_size(config: Any) -> int:
    """The dense MLP's width. LFM2's configs give a nominal width its MLP derives the real one from
    (`block_auto_adjust_ff_dim`: two thirds of it, times a multiplier, rounded up to a multiple)."""
    size = int(config.intermediate_size)
    if not getattr(config, "block_auto_adjust_ff_dim", False):
        return size
    size = int(2 * size / 3)
    multiplier = getattr(config, "block_ffn_dim_multiplier", None)
    if multiplier is not None:
        multiple = int(config.block_multiple_of)
        size = multiple * ((int(multiplier * size) + multiple - 1) // multiple)
    return size


def _rope_field(config: Any, name: str) -> Any:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and name in rope:
        return rope[name]
    return getattr(config, name, None)


def _rope_type(config: Any) -> str:
    """The model's RoPE type; with one RoPE per layer type (Gemma 3), the first non-default one."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return "default"
    per_kind = [value for value in rope.values() if isinstance(value, dict)]
    kinds = per_kind or [rope]
    types = [str(kind.get("rope_type", kind.get("type", "default"))) for kind in kinds]
    # HunYuan's checkpoints say "dynamic" with a fixed NTK `alpha`: static frequencies, as its
    # rotary module reads them ("ntk_alpha"), not the dynamic scaling that grows with the length.
    types = ["ntk_alpha" if t == "dynamic" and kind.get("alpha") else t for t, kind in zip(types, kinds, strict=True)]
    return next((t for t in types if t != "default"), "default")
