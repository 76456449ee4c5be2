"""`genai_config.json`: what onnxruntime-genai needs to load an output folder and generate.

onnxruntime-genai (the runtime ORT LLMs are deployed with: C, C#, Java and Python APIs) reads
the model type, token ids, context length, head sizes and the KV input/output name patterns
from this file, the tokenizer from `tokenizer.json`/`tokenizer_config.json` beside it (which
`surgery apply` copies from the model's folder, or writes with the tokenizer's `save_pretrained`
when the folder has no tokenizer.json: `surgery.models.tokenizer`), and search defaults from its
`search` section. Our graphs take `input_ids`, `attention_mask` (and `position_ids` when
exported with them) and the KV slots `past_key_values.{slot}.key|value` -> `present.{slot}...`
numbered over the layers that kept their attention, so genai's default KV cache finds them
from the patterns; extra outputs (the fused layer of dynamic fusion) are not named and genai
leaves them alone.

The CPU form does not share the KV buffers between past and present (`past_present_share_buffer`
false): its padding bias spans the mask's length, shorter than a shared buffer. The CUDA form
(`export onnx for cuda`: no bias, `seqlens_k` from the mask) shares them, as the builder's
CUDA models do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from surgery.models.tokenizer import ModelTokenizer

# Hugging Face model_type -> the model type onnxruntime-genai 0.18 knows for it. Every one of
# these is genai's generic decoder-only model; the graph itself carries every family detail
# (norm offsets, soft-capping, windows, scalars), so a family genai has no name for runs as
# "llama" (its generic decoder).
GENAI_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3_text",
    "phi3": "phi3",
    "granite": "granite",
    "olmo2": "olmo",
    "lfm2": "lfm2",  # genai's LFM2 model carries the convolution states (`layer_types`)
}
GENERIC_MODEL_TYPE = "llama"

# Search defaults genai takes from the model's generation config, when it sets them.
_SEARCH_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams")


@dataclass(frozen=True)
class KvLayout:
    """The attention shape every KV slot shares (genai's default cache assumes one)."""

    slots: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def kv_layout(graph) -> KvLayout | None:
    """The KV slots' common shape, or None when slots differ (genai's default cache cannot hold them).

    Only key/value heads and head size shape a cache; layers may differ in query heads (`drop
    heads`), and genai is told the model's original count."""
    nodes = [graph.layer(index).attention for index in graph.kv_layers()]
    shapes = {(node.num_kv_heads, node.head_dim) for node in nodes}
    if len(shapes) > 1:
        return None
    kv_heads, head_dim = shapes.pop() if shapes else (graph.index.num_kv_heads, graph.index.head_dim)
    return KvLayout(len(nodes), graph.index.num_heads, kv_heads, head_dim)


def _ids(value) -> int | list[int] | None:
    if isinstance(value, (list, tuple)):
        ids = [int(v) for v in value if v is not None]
        return ids[0] if len(ids) == 1 else ids or None
    return None if value is None else int(value)


def token_ids(config, generation, tokenizer) -> dict:
    """bos/eos/pad ids: the generation config first, then the model config, then the tokenizer
    (a tokenizer, or a `ModelTokenizer` loaded only when the configs leave an id open)."""

    def first(name: str):
        for source in (generation, config, tokenizer):
            if isinstance(source, ModelTokenizer):
                source = source.get()
            value = getattr(source, f"{name}_token_id", None) if source is not None else None
            if value is not None:
                return _ids(value)
        return None

    eos = first("eos")
    pad = first("pad")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {"bos_token_id": first("bos"), "eos_token_id": eos, "pad_token_id": pad}


def genai_config(
    graph,
    context_length: int,
    kv_cache: bool,
    position_ids: bool,
    tokenizer=None,
    provider_options=None,
    share_buffer: bool = False,
) -> dict:
    """The genai_config.json content for an export of `graph` (raises ValueError if genai cannot run it)."""
    if not kv_cache:
        raise ValueError("exported without kv-cache: onnxruntime-genai needs the KV cache inputs")
    layout = kv_layout(graph)
    if layout is None:
        raise ValueError("the KV slots differ in head counts or sizes: genai's default KV cache needs one shape")
    own = [index for index in graph.kv_layers()
           if getattr(graph.layer(index).attention.kv_quant, "format", None) is not None
           and not graph.layer(index).attention.kv_quant.format.native]  # fmt: skip
    if own:
        raise ValueError("a pre-rope KV cache is stored and read by operators of surgery's own, not by "
                         "GroupQueryAttention, whose layouts genai allocates; `surgery run` and onnxruntime "
                         "run it")  # fmt: skip
    formats = {_cache_format(graph.layer(index).attention) for index in graph.kv_layers()}
    if len(formats) > 1:
        raise ValueError("the layers' KV caches differ in width (" + ", ".join(sorted(formats)) + "): genai's "
                         "default KV cache holds one element type; `surgery run` and onnxruntime run it")  # fmt: skip
    config = graph.model.config
    generation = getattr(graph.model, "generation_config", None)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    search = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": int(context_length),
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": share_buffer,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    for field in _SEARCH_FIELDS:
        value = getattr(generation, field, None) if generation is not None else None
        if value is not None:
            search[field] = type(search[field])(value)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": list(provider_options or [])},
        "filename": "model.onnx",
        "head_size": layout.head_dim,
        "hidden_size": graph.index.hidden_size,
        "inputs": inputs,
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": layout.num_heads,
        "num_hidden_layers": layout.slots,
        "num_key_value_heads": layout.num_kv_heads,
    }
    _add_conv_states(graph, decoder, layout.slots)
    return {
        "model": {
            **token_ids(config, generation, tokenizer),
            "context_length": int(context_length),
            "decoder": decoder,
            "type": GENAI_MODEL_TYPES.get(graph.index.architecture, GENERIC_MODEL_TYPE),
            "vocab_size": graph.index.vocab_size,
        },
        "search": search,
    }


def _add_conv_states(graph, decoder: dict, kv_slots: int) -> None:
    """Short-convolution states (LFM2) as genai's LFM2 model reads them: `layer_types` names each
    state slot's kind (the KV slots first, then the convolution states, as the export numbers
    them), `past.%d.conv`/`present.%d.conv` their inputs and outputs, `conv_cache_size` the
    positions each carries. The slots are genai's "layers": a layer without attention or a
    convolution (dropped) has no state and no entry."""
    convs = [graph.layer(index).attention for index in graph.conv_layers()]
    if not convs:
        return
    widths = {node.state_width for node in convs}
    if len(widths) > 1:
        raise ValueError("the convolution layers differ in kernel width: genai's conv state needs one")
    decoder["inputs"]["past_conv_names"] = "past.%d.conv"
    decoder["outputs"]["present_conv_names"] = "present.%d.conv"
    decoder["num_hidden_layers"] = kv_slots + len(convs)
    decoder["layer_types"] = ["full_attention"] * kv_slots + ["conv"] * len(convs)
    decoder["conv_cache_size"] = widths.pop()


def _cache_format(node) -> str:
    """One layer's cache as genai must allocate it: the element type, or a quantized format."""
    return node.kv_quant.format.name if node.kv_quant is not None else "float"


def write_genai_config(folder: str, content: dict) -> str:
    """Write `genai_config.json` into `folder`; returns its path."""
    path = os.path.join(folder, "genai_config.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=4)
        handle.write("\n")
    return path
