"""What an architecture description says: a decoder family as data.

A family is one `Architecture` value: the sub-blocks of a layer and where their norms sit, the
norm's form, the MLP's activation, the attention details (Q/K norms, scaling, soft-capping,
sliding windows, RoPE per layer type), the scalar multipliers some families add, and the map
to the Hugging Face parameter names. `surgery.architectures.build` turns a description and a
loaded Hugging Face model into the typed nodes of `surgery.ir.graph` (references to the
model's tensors, never copies); each node kind runs in PyTorch and emits itself in ONNX
(`surgery.nodes`). Nothing else in the compiler looks at the family's name.

Config-valued details are given as the name of the config field that holds them (for
example `attention_scale=Scale.field("attention_multiplier")`), so a description stays a short
literal and the values come from each model's own config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

NormPlacement = Literal["pre", "post", "sandwich"]
Activation = Literal["silu", "gelu_tanh", "relu2"]
QKNorm = Literal["none", "head", "projection"]
Sliding = Literal["layer_types", "all", "none"]
MoeRouter = Literal["none", "softmax_topk", "softmax_topk_scaled", "topk_softmax_clamped", "sparsemixer",
                   "sigmoid_biased"]


class DescriptionError(ValueError):
    """A description that does not fit the model it is applied to (a module it names is missing)."""


@dataclass(frozen=True)
class Norms:
    """The RMSNorms of a layer.

    `offset` is added to the stored gain (Gemma stores `w` and applies `1 + w`). `placement`:
    `pre` normalizes each sub-block's input (Llama); `post` normalizes its output before the
    residual add (OLMo 2); `sandwich` does both (Gemma 3).
    """

    placement: NormPlacement = "pre"
    offset: float = 0.0
    eps_field: str = "rms_norm_eps"
    kind: Literal["rms", "layer"] = "rms"  # RMSNorm, or LayerNorm (mean subtracted; OLMo)
    eps: float | None = None  # an epsilon the family fixes in code rather than its config (OLMo: 1e-5)


@dataclass(frozen=True)
class Scale:
    """A scalar a family multiplies by: a constant, the square root of a config field, a config
    field itself, or the inverse square root of one (`kind`)."""

    kind: Literal["one", "field", "sqrt_field", "rsqrt_field"] = "one"
    name: str = ""

    @staticmethod
    def field(name: str) -> Scale:
        """The value of config field `name`."""
        return Scale("field", name)

    @staticmethod
    def sqrt(name: str) -> Scale:
        """The square root of config field `name` (Gemma's embedding scale: sqrt(hidden_size))."""
        return Scale("sqrt_field", name)

    @staticmethod
    def rsqrt(name: str) -> Scale:
        """One over the square root of config field `name` (a query scaling)."""
        return Scale("rsqrt_field", name)

    def value(self, config: object, default: float = 1.0) -> float:
        """The scalar for one model's config (`default` when the field is missing or null)."""
        if self.kind == "one":
            return default
        raw = getattr(config, self.name, None)
        if raw is None:
            return default
        number = float(raw)
        if self.kind == "field":
            return number
        return number**0.5 if self.kind == "sqrt_field" else number**-0.5


@dataclass(frozen=True)
class Attention:
    """Attention details. Projections are either separate (`q`, `k`, `v`) or one fused matrix
    (`qkv`, rows in Q, K, V order). The query scaling defaults to 1/sqrt(head_dim)."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    qk_norm: QKNorm = "none"  # RMSNorm over each head (Qwen3, Gemma 3) or the whole projection (OLMo)
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    scale: Scale = Scale()
    softcap_field: str | None = None  # tanh soft-capping of the attention scores
    clip_field: str | None = None  # clamp Q, K and V to +-value (OLMoE)
    sliding: Sliding = "layer_types"  # which layers use the sliding window
    rope_per_layer_type: bool = False  # one RoPE table per `layer_types` entry (Gemma 3)
    # A config list saying per layer whether it uses RoPE at all (1) or none (0): SmolLM3's
    # `no_rope_layers`, every fourth layer without positions (NoPE).
    rope_layers_field: str | None = None
    rope_interleaved: bool = False  # RoPE turns adjacent pairs of dimensions (GLM, ERNIE 4.5)
    qk_norm_after_rope: bool = False  # the per-head Q/K norms normalize the rotated heads (HunYuan)
    sinks: str | None = None  # the parameter of per-head attention-sink logits (gpt-oss: "sinks")
    rope_tables_once: bool = False  # the rotary module returns each frequency once, not twice (gpt-oss)
    # Multi-head latent attention (DeepSeek-V2/V3): q_proj or q_a_proj/q_a_layernorm/q_b_proj,
    # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; the cache holds the latent (surgery/nodes/latent_attention.py).
    latent: bool = False


@dataclass(frozen=True)
class Mlp:
    """The MLP: a gated dense MLP (gate, up, down; or `gate_up` fused with gate rows first), a
    plain one without a gate (`gated=False`: up, activation, down; Nemotron's squared ReLU), or
    a mixture of experts handled by the MoE node (`router`)."""

    activation: Activation = "silu"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None
    router: MoeRouter = "none"
    gated: bool = True


@dataclass(frozen=True)
class Convolution:
    """Short-convolution blocks in place of attention in some layers (LFM2): `in_proj` to three
    channels' worth (B, C, x), a causal depthwise convolution of `B * x` over time, `C` times its
    output, `out_proj`. The layers that have one are those whose `layer_types` entry is
    `layer_type`; their module is `module`, and the convolution's window is the kernel width of
    its `conv`."""

    module: str = "conv"
    layer_type: str = "conv"


@dataclass(frozen=True)
class Names:
    """Hugging Face module names: the model body, its layers, and each layer's parts."""

    body: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    # Norm module names by role; roles the placement does not use are ignored.
    attention_pre_norm: str = "input_layernorm"
    attention_post_norm: str = "post_attention_layernorm"
    mlp_pre_norm: str = "post_attention_layernorm"
    mlp_post_norm: str = "post_feedforward_layernorm"
    rotary: str = "rotary_emb"  # the body's rotary embedding module


@dataclass(frozen=True)
class Architecture:
    """One decoder family, as data. See the module docstring."""

    model_type: str
    hf_class: str
    norms: Norms = Norms()
    attention: Attention = Attention()
    mlp: Mlp = Mlp()
    names: Names = Names()
    convolution: Convolution | None = None  # short-convolution blocks in some layers (LFM2)
    embedding_scale: Scale = Scale()
    residual_scale: Scale = Scale()  # multiplies each sub-block's output before the residual add
    logits_divisor: Scale = Scale()  # logits are divided by it (Granite's logits_scaling)
    final_softcap_field: str | None = None  # tanh soft-capping of the logits
    activation_field: str = "hidden_act"
    # Config values this description is written for: {field: allowed values}. A model whose
    # config holds another value is refused at `check` with the field named.
    requires: dict[str, tuple] = field(default_factory=dict)
    notes: str = ""

    def sliding_layers(self, config: object) -> list[bool]:
        """Which layers of a model with this config use the sliding window."""
        layers = int(config.num_hidden_layers)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None or self.attention.sliding == "none":
            return [False] * layers
        if self.attention.sliding == "all":
            return [True] * layers
        if layer_types is None or not getattr(config, "use_sliding_window", True):
            return [False] * layers
        return [t == "sliding_attention" for t in layer_types]

    def conv_layers(self, config: object) -> list[bool]:
        """Which layers of a model with this config have a short-convolution block instead of attention."""
        layers = int(config.num_hidden_layers)
        if self.convolution is None:
            return [False] * layers
        types = list(getattr(config, "layer_types", None) or [])
        return [i < len(types) and types[i] == self.convolution.layer_type for i in range(layers)]

    def mixer_names(self, config: object) -> list[str]:
        """Each layer's token-mixer module name: its attention's, or its convolution's."""
        conv = self.convolution.module if self.convolution is not None else ""
        return [conv if is_conv else self.names.attention for is_conv in self.conv_layers(config)]

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.mlp.router != "none"
