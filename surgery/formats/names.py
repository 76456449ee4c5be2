"""Names the plan and the exporter give tensors: one place builds and reads them."""

from __future__ import annotations

EMBEDDING = "model.embed_tokens"  # the plan target of `quantize embedding`
HEAD = "lm_head"  # the head's linear (a plan target, and its exported MatMul's name)
ATTENTION_LINEARS = ("qkv_proj", "o_proj")  # Q, K and V are exported as one packed qkv_proj
CONV_LINEARS = ("in_proj", "out_proj")  # a short-convolution layer's projections (LFM2), in the attention's place
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
LINEAR_ORDER = (*ATTENTION_LINEARS, *CONV_LINEARS, *MLP_LINEARS, HEAD)


def layer_linear(layer: int, kind: str) -> str:
    """The exported name of one linear of a layer (`kind` one of ATTENTION_LINEARS, CONV_LINEARS or
    MLP_LINEARS)."""
    owner = "self_attn" if kind in ATTENTION_LINEARS else "conv" if kind in CONV_LINEARS else "mlp"
    return f"model.layers.{layer}.{owner}.{kind}"


def linear_kind(name: str) -> str:
    """The kind of an exported linear ("qkv_proj", ..., "lm_head")."""
    return name.rsplit(".", 1)[-1]


def linear_layer(name: str) -> int | None:
    """The layer an exported linear belongs to (`model.layers.3.mlp.up_proj` -> 3); None for the head."""
    if name == HEAD:
        return None
    return int(name.split(".")[2])


def linear_of_packed_weight(initializer: str) -> str:
    """The exported linear a MatMulNBits' packed weight belongs to (`<linear>.weight_Q<bits>` ->
    `<linear>`): the exporter and onnxruntime's quantizer name it so."""
    return initializer.rsplit(".weight_Q", 1)[0]
