"""A checked checkpoint's module tree, built from its tensor index without transformers' model code.

Loading a model the usual way (`surgery.models.loading._lazy_model`) builds the Hugging Face
model on the meta device, which imports transformers' model classes: with them its generation
utilities, its integrations and torch's distributed and compiler modules (1.9 s here, 8-10 s
on the lent GPU host, where importing them registers 128 custom operators). Once a checkpoint
has loaded that way and its family's description has passed the conformance check against the
Hugging Face forward (a marker in the cache, keyed by the files' sizes and times, the
description and surgery's version), what the graph needs from the model is only

- the module tree under the checkpoint's own tensor names (the description finds its parts by
  name; `LazyWeights` binds each parameter to its tensor by name), on the meta device;
- the rotary embedding, here transformers' `LlamaRotaryEmbedding` computation (the same class
  in every family listed in `FAMILIES`; its scaling variants come from transformers'
  `modeling_rope_utils`, which is light);
- the config and the generation config made from it, as `from_config` makes them. The config
  is rebuilt from the record the check stored beside its marker (`config_record`): every
  attribute the family's config class resolved, defaults included, in transformers' base
  `PreTrainedConfig`. Importing a family's config class would import transformers' auto model
  classes (its docstring decorator looks them up), which is what this load avoids.

So a checked checkpoint of those families loads from this tree instead. Shapes are not
checked again here: the marker says these exact files loaded and matched the config before.
"""

from __future__ import annotations

from typing import Any

import torch

from surgery.models.lazy import Checkpoint, LazyWeights

# Families whose transformers rotary embedding is LlamaRotaryEmbedding's code, checked by
# tests/test_skeleton.py against the installed transformers.
FAMILIES = ("llama", "mistral", "granite", "qwen2", "qwen3")


class RotaryEmbedding(torch.nn.Module):
    """transformers' `LlamaRotaryEmbedding` (Apache-2.0), the same arithmetic in the same order,
    so its tables are bit-identical to the Hugging Face model's."""

    def __init__(self, config: Any):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        init = self.default_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init(config)
        self.inv_freq = torch.nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = torch.nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def default_parameters(config: Any, **_: Any) -> tuple[torch.Tensor, float]:
        """Inverse frequencies of the original RoPE, and no scaling."""
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for these positions, updated first for dynamic RoPE types as transformers does."""
        from transformers.modeling_rope_utils import dynamic_rope_update

        return dynamic_rope_update(RotaryEmbedding._tables)(self, x, position_ids)

    def _tables(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def config_record(config: Any) -> dict[str, Any]:
    """A config as plain JSON data: its `to_dict()` and the plain instance attributes that leaves
    out (`use_cache`), so `config_from_record` gives back every attribute the graph reads."""
    record = config.to_dict()
    for name, value in vars(config).items():
        if name not in record and not name.startswith("_") and isinstance(value, (bool, int, float, str, type(None))):
            record[name] = value
    return record


def config_from_record(record: dict[str, Any]) -> Any:
    """The config a record holds, in transformers' base config class (no family module imported)."""
    from transformers import configuration_utils

    base = getattr(configuration_utils, "PreTrainedConfig", None) or configuration_utils.PretrainedConfig
    config = base.from_dict(dict(record))
    for name, value in record.items():  # what the base class sets aside (use_cache), as the family had it
        if not hasattr(config, name):
            setattr(config, name, value)
    return config


class _Gain(torch.nn.Module):
    """A norm's module as the description reads it: its gain only (the epsilon is the config's)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(size, device="meta"))


def _leaf(parameters: dict[str, tuple[int, ...]]) -> torch.nn.Module | None:
    """A linear (a 2-D weight, maybe a bias) or a norm (a 1-D weight) on the meta device."""
    weight = parameters.get("weight")
    if weight is None or not set(parameters) <= {"weight", "bias"}:
        return None
    if len(weight) == 1 and "bias" not in parameters:
        return _Gain(weight[0])
    if len(weight) != 2:
        return None
    return torch.nn.Linear(weight[1], weight[0], bias="bias" in parameters, device="meta")


def _tree(node: dict) -> torch.nn.Module | None:
    """Nested dicts (name -> child, leaves already modules) as modules; numbered children
    0..n-1 as a ModuleList, in order."""
    if isinstance(node, torch.nn.Module):
        return node
    children = {name: _tree(child) for name, child in node.items()}
    if any(child is None for child in children.values()):
        return None
    if children and all(name.isdigit() for name in children):
        if sorted(int(name) for name in children) != list(range(len(children))):
            return None
        return torch.nn.ModuleList([children[str(i)] for i in range(len(children))])
    module = torch.nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


def skeleton_model(folder: str, files: dict[str, list[str]], config: Any, body: str, embed: str,
                   head: str) -> tuple[Any, LazyWeights] | None:  # fmt: skip
    """(meta-device module tree, its LazyWeights) of a checked checkpoint of one of `FAMILIES`,
    or None when its tensors do not make that tree (the usual load runs then). `body`, `embed`
    and `head` are the description's names of the model body, its embedding and the head."""
    if config.model_type not in FAMILIES:
        return None
    checkpoint = Checkpoint(folder, files)
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    for name in checkpoint.names():
        owner, _, parameter = name.rpartition(".")
        grouped.setdefault(owner, {})[parameter] = tuple(checkpoint.shape_and_dtype(name)[0])
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        grouped.pop(head, None)  # transformers ties the head to the embedding, stored or not
    nested: dict = {body: {}}  # the body first: a tied parameter is named after the embedding
    for owner, parameters in grouped.items():
        leaf = _leaf(parameters)
        if leaf is None or not owner:
            return None
        *path, last = owner.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
            if isinstance(node, torch.nn.Module):
                return None
        if last in node:
            return None
        node[last] = leaf
    model = _tree(nested)
    if model is None or not hasattr(model, body):
        return None
    trunk = getattr(model, body)
    embedding = getattr(trunk, embed, None)
    if embedding is None or not isinstance(getattr(trunk, "layers", None), torch.nn.ModuleList):
        return None
    if len(trunk.layers) != int(config.num_hidden_layers):
        return None
    if tied:
        tied_head = torch.nn.Module()
        tied_head.weight = embedding.weight  # the same Parameter, as transformers ties it
        model.add_module(head, tied_head)
    elif not hasattr(model, head):
        return None
    trunk.add_module("rotary_emb", RotaryEmbedding(config))
    from transformers import GenerationConfig

    config._name_or_path = folder
    model.config = config
    # From the record, as transformers makes it from the family's config (use_cache included).
    model.generation_config = GenerationConfig.from_model_config(config_record(config))
    return model.eval(), LazyWeights(model, checkpoint)
