"""Is the description right? The reference forward built from it against Hugging Face's own.

Verification compares the exported ONNX model with `DecoderGraph.forward`; both are built from
the architecture description, so a wrong description (a missing norm offset, a wrong scale)
would pass it. This check closes that gap: when a model is loaded, both forwards run on a few
tokens and every intermediate is compared in order (the embedding, then per layer the
attention output, the MLP output and the layer's output, then the logits). The first one that
differs is named, before anything is exported.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import surgery
from surgery.architectures.description import DescriptionError
from surgery.diagnostics import HintedError
from surgery.ir.graph import DecoderGraph
from surgery.ir.inputs import position_ids_from_mask
from surgery.models.builtin import cache_dir
from surgery.models.skeleton import config_record
from surgery.models.weights import WeightsError, weight_files

PROBE_TOKENS = 24
RELATIVE_TOLERANCE = 1e-4  # of the Hugging Face tensor's largest magnitude; fp32 agrees to ~1e-6
ABSOLUTE_TOLERANCE = 1e-5


class DescriptionMismatch(HintedError):
    """The reference built from the description computes something else than the HF model."""


@dataclass(frozen=True)
class Difference:
    """Where the two forwards first part: the layer (None outside layers), the sub-block, how much."""

    layer: int | None
    part: str
    max_abs_diff: float
    scale: float

    def message(self, architecture: str) -> str:
        """The diagnostic's text."""
        where = f"layer {self.layer} {self.part}" if self.layer is not None else self.part
        return (
            f"the '{architecture}' description does not reproduce the Hugging Face model: {where} differs "
            f"by {self.max_abs_diff:.3g} (values up to {self.scale:.3g})"
        )


def probe_ids(vocab_size: int, count: int = PROBE_TOKENS) -> torch.Tensor:
    """Deterministic token ids spread over the vocabulary (no tokenizer needed)."""
    return ((torch.arange(count) * 7919 + 13) % vocab_size)[None]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _hf_trace(model: Any, graph: DecoderGraph, ids: torch.Tensor) -> dict[tuple, torch.Tensor]:
    names = graph.architecture.names
    layers = getattr(getattr(model, names.body), names.layers)
    seen: dict[tuple, torch.Tensor] = {}
    handles = []

    def keep(key):
        return lambda module, args, output: seen.__setitem__(key, _first(output).detach().clone())

    def embedding(module, args, kwargs):  # the first layer's input is the (scaled) embedding
        seen[("embedding",)] = (args[0] if args else kwargs["hidden_states"]).clone()

    handles.append(layers[0].register_forward_pre_hook(embedding, with_kwargs=True))
    mixers = graph.architecture.mixer_names(model.config)
    for i, layer in enumerate(layers):
        handles.append(getattr(layer, mixers[i]).register_forward_hook(keep((i, "attention"))))
        handles.append(getattr(layer, names.mlp).register_forward_hook(keep((i, "mlp"))))
        handles.append(layer.register_forward_hook(keep((i, "output"))))
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    seen[("logits",)] = out.logits.detach()
    return seen


@torch.no_grad()
def _our_trace(graph: DecoderGraph, ids: torch.Tensor) -> dict[tuple, torch.Tensor]:
    seen: dict[tuple, torch.Tensor] = {("embedding",): graph.embedding(ids)}
    handles = []
    for layer in graph.layers:
        if layer.attention is not None:
            handles.append(layer.attention.register_forward_hook(
                lambda m, a, o, i=layer.index: seen.__setitem__((i, "attention"), _first(o).clone())))  # fmt: skip
        if layer.mlp is not None:
            handles.append(layer.mlp.register_forward_hook(
                lambda m, a, o, i=layer.index: seen.__setitem__((i, "mlp"), _first(o).clone())))  # fmt: skip

    def observe(index: int, x: torch.Tensor, m: torch.Tensor, h: torch.Tensor) -> None:
        seen[(index, "output")] = h.clone()

    mask = torch.ones_like(ids)
    try:
        logits = graph.forward(ids, mask, position_ids_from_mask(mask), observer=observe)
    finally:
        for handle in handles:
            handle.remove()
    seen[("logits",)] = logits
    return seen


def first_difference(
    model: Any, graph: DecoderGraph, tokens: int = PROBE_TOKENS, ids: torch.Tensor | None = None
) -> Difference | None:
    """Run both forwards on `tokens` probe tokens; the first intermediate that differs, or None.

    `graph` must be unedited (every layer and sub-block present) and `model` its source.
    """
    if ids is None:
        ids = probe_ids(graph.index.vocab_size, min(tokens, graph.index.max_positions))
    theirs = _hf_trace(model, graph, ids)
    ours = _our_trace(graph, ids)
    order = [("embedding",)]
    for layer in graph.layers:
        order += [(layer.index, "attention"), (layer.index, "mlp"), (layer.index, "output")]
    order.append(("logits",))
    parts = {"attention": "attention output", "mlp": "MLP output", "output": "output (norms and residual adds)"}
    for key in order:
        if key not in theirs or key not in ours:
            continue
        a, b = theirs[key].float(), ours[key].float()
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
        if not diff <= RELATIVE_TOLERANCE * scale + ABSOLUTE_TOLERANCE:
            if len(key) == 1:
                return Difference(None, key[0], diff, scale)
            return Difference(key[0], parts[key[1]], diff, scale)
    return None


def fingerprint(folder: str, architecture: Any) -> str | None:
    """What a verdict depends on: surgery's version, the description, the probe, and the size and
    modification time of the model folder's config and weight files. None when the model was
    not loaded from a folder (the tiny built-ins: checked every time, which is cheap)."""
    if not folder or not os.path.isdir(folder):
        return None
    files = sorted(["config.json", *weight_files(folder)])
    try:
        stats = [(name, (Path(folder) / name).stat()) for name in files]
    except OSError:
        return None
    facts = [surgery.__version__, repr(architecture), PROBE_TOKENS, RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE,
             os.path.abspath(folder), [(name, st.st_size, st.st_mtime_ns) for name, st in stats]]  # fmt: skip
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def _marker(folder: str, architecture: Any) -> Path | None:
    key = fingerprint(folder, architecture)
    return cache_dir() / "conformance" / key if key else None


def already_checked(folder: str, architecture: Any) -> bool:
    """Whether this checkpoint (these exact files) loaded and passed the check against the
    Hugging Face forward with this description before: its marker is in the cache."""
    marker = _marker(folder, architecture)
    return marker is not None and marker.exists()


def checked_config(folder: str, architecture: Any) -> dict | None:
    """The config record (`surgery.models.skeleton.config_record`) stored when this checkpoint
    passed the check with this description; None when it did not, or its marker holds none."""
    return _recorded_config(_marker(folder, architecture))


def _recorded_config(marker: Path | None) -> dict | None:
    try:
        content = json.loads(marker.read_text()) if marker is not None else None
    except (OSError, ValueError):  # no marker, or one written before markers held the config
        return None
    return content.get("config") if isinstance(content, dict) else None


def probe_layers(config: Any) -> int:
    """How many leading layers the lazily loaded probe keeps: one of every layer type there is
    (Gemma 3's first full-attention layer is its sixth), and at least two."""
    types = list(getattr(config, "layer_types", None) or [])
    layers = int(config.num_hidden_layers)
    needed = max((types.index(kind) for kind in set(types)), default=0) + 1
    return min(layers, max(2, needed))


@torch.no_grad()
def lazy_probe(graph: DecoderGraph, tokens: int = PROBE_TOKENS) -> tuple[Any, DecoderGraph, torch.Tensor]:
    """(HF model, its graph, probe ids) of a small real copy of a lazily loaded model.

    The copy keeps the first `probe_layers` layers with their real weights and, of the
    vocabulary, only the probe's tokens: the embedding rows they look up and the head rows of
    their logits. Each intermediate is then exactly the full model's (a layer sees only the
    layers before it; a logit is one row of the head), at a fraction of the memory: the check
    never needs the whole model in memory.
    """
    from transformers import AutoModelForCausalLM

    from surgery.models.index import ModelIndex

    config = copy.deepcopy(graph.model.config)
    ids = probe_ids(graph.index.vocab_size, min(tokens, graph.index.max_positions))
    rows = torch.unique(ids)
    layers = probe_layers(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:layers]
    config.vocab_size = int(rows.numel())
    config.pad_token_id = None
    small = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    weights = graph.weights
    full_names = set(weights.names.values())
    state, problems = {}, []
    for name, param in small.state_dict(keep_vars=True).items():
        if name not in full_names:
            continue  # buffers, and a tied head (the embedding's rows)
        shape = weights.shape(name)
        try:
            if shape != tuple(param.shape):  # embedding and head: the probe's rows only
                state[name] = weights.load_rows(name, rows.tolist())
            else:
                state[name] = weights.load(name)
        except WeightsError as problem:  # every damaged tensor of the copy at once
            problems += problem.problems
    if problems:
        raise WeightsError(problems)
    small.load_state_dict(state, strict=False)
    small.tie_weights()
    small_graph = DecoderGraph(small, ModelIndex.from_config(graph.index.name, config), graph.architecture)
    return small, small_graph, torch.searchsorted(rows, ids)


def check_description(model: Any, graph: DecoderGraph) -> None:
    """Raise DescriptionMismatch when the graph's reference differs from the HF model's forward.

    A checkpoint that passed once with the same description is not checked again (a marker in
    `$SURGERY_CACHE/conformance`, keyed by `_fingerprint`): the two forwards cost about half a
    second on a 135M model, which every `surgery apply` would pay.
    """
    folder = getattr(model.config, "_name_or_path", "") or ""
    marker = _marker(folder, graph.architecture)
    if marker is not None and marker.exists():
        if _recorded_config(marker) is None:  # a marker from before markers held the config
            _mark(marker, graph, model)
        return
    if graph.weights is not None:
        small, small_graph, ids = lazy_probe(graph)
        difference = first_difference(small, small_graph, ids=ids)
    else:
        difference = first_difference(model, graph)
    if difference is None:
        if marker is not None:
            _mark(marker, graph, model)
        return
    raise DescriptionMismatch(
        difference.message(graph.architecture.model_type),
        "the architecture description (surgery/architectures/) or the model's config is wrong for this "
        "checkpoint; nothing was exported",
    )


def _mark(marker: Path, graph: DecoderGraph, model: Any) -> None:
    """Record that the checkpoint passed, with its config (what the skeleton load rebuilds it from);
    written whole or not at all, and a read-only cache only costs the check next time."""
    record = {"model_type": graph.architecture.model_type, "config": config_record(model.config)}
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        partial = marker.with_name(f"{marker.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, marker)


def checked_graph(model: Any, index: Any, weights: Any = None) -> DecoderGraph:
    """The decoder graph of a freshly loaded model (lazily loaded with `weights`), its description
    checked against the model's own forward (DescriptionMismatch when they differ)."""
    try:
        graph = DecoderGraph(model, index, weights=weights)
    except DescriptionError as problem:
        raise DescriptionMismatch(str(problem), "the architecture description (surgery/architectures/) does not fit "
                                  "this checkpoint; nothing was exported") from problem  # fmt: skip
    check_description(model, graph)
    return graph
