"""The decoder graph that passes rewrite, and its PyTorch reference forward.

A decoder is a chain: embedding -> layers -> head. Each layer has an attention and an MLP
sub-block; a sub-block's update is `scale * PostNorm(Body(PreNorm(x)))` added to the residual
stream, where the norms present depend on the family (pre: Llama; post: OLMo 2; both: Gemma 3).
`DecoderGraph` holds that chain as typed nodes (`surgery.nodes`) built from the family's
architecture description (`surgery.architectures`); a pass removes a sub-block with its norms,
a whole layer, or replaces an MLP node. Layers keep their *original* numbers throughout.

`DecoderGraph.forward` runs the edited chain with the nodes' own PyTorch forwards, which makes
it the reference the exported ONNX model is verified against; `surgery.architectures.conformance`
checks it against the Hugging Face model's own forward when a model is loaded. Its mask and KV
cache are our own so that layers without attention simply have no cache slot: cache slot k
belongs to the k-th kept attention layer (and convolution state k, LFM2's, to the k-th kept
short-convolution layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from surgery.architectures import lookup
from surgery.architectures.build import build
from surgery.architectures.description import Architecture
from surgery.ir.inputs import KVCache, ResidualObserver, attention_bias, on_device
from surgery.ir.layer import DecoderLayer, walk_layer
from surgery.models.index import ModelIndex
from surgery.models.lazy import LazyWeights, unique_parameters
from surgery.nodes.attention import NO_ROPE, Attention
from surgery.nodes.fusion import FusionChoice, HeadFusion, fused_logits
from surgery.nodes.norm import RMSNorm
from surgery.nodes.short_conv import ShortConv
from surgery.progress import advance


class DecoderGraph:
    """A decoder-only causal LM as an editable chain of typed nodes over the model's tensors."""

    def __init__(
        self,
        model: Any,
        index: ModelIndex,
        architecture: Architecture | None = None,
        weights: LazyWeights | None = None,
    ):
        """Nodes for `model` as its registered description (or `architecture`) says.

        With `weights`, the model's parameters are on the meta device and stay in the checkpoint
        until a step asks for some (`materialized`).
        """
        self.model = model
        self.weights = weights
        self._spills = 0  # files of rewritten parameters written so far (`spill_rewritten`)
        self.index = index
        self.config = model.config
        self.architecture = architecture or lookup(index.architecture)
        if self.architecture is None:
            raise ValueError(f"no architecture description for '{index.architecture}'")
        built = build(self.architecture, model)
        self.embedding = built.embedding
        self.head = built.head
        self.rotary = built.rotary
        self.fusion: HeadFusion | None = None  # set by the `fuse` pass
        self.last_choice: FusionChoice | None = None  # dynamic fusion's choice in the last forward
        self.layers: list[DecoderLayer] = [
            DecoderLayer(
                i,
                b.attention,
                b.mlp,
                b.attention_norm,
                b.attention_post_norm,
                b.mlp_norm,
                b.mlp_post_norm,
                b.residual_scale,
            )  # fmt: skip
            for i, b in enumerate(built.layers)
        ]
        if weights is not None:
            for module in self.all_modules():
                for part in module.modules():
                    parents = getattr(part, "fused_parents", None)
                    if parents is None:
                        continue
                    for param, parent in zip((part.weight, part.bias), parents, strict=True):
                        if parent is not None and weights.knows(parent):
                            weights.add_view(param, parent)

    def all_modules(self) -> list[torch.nn.Module]:
        """Every node still in the graph: embedding, each layer's sub-blocks and norms, head."""
        modules: list[torch.nn.Module] = [self.embedding]
        for layer in self.layers:
            modules += layer.modules()
        return [*modules, self.head]

    @contextlib.contextmanager
    def materialized(self, *modules: torch.nn.Module | None, device: str | None = None) -> Iterator[None]:
        """Within the block, the parameters of `modules` are loaded; those it loaded are released after.

        A graph loaded in memory (no lazy weights) has everything loaded already. With a
        `device` other than the CPU the modules also move there for the block and back after.
        """
        present = [module for module in modules if module is not None]
        if self.weights is None:
            with on_device(present, device):
                yield
            return
        loaded = self.weights.materialize(unique_parameters(present))
        try:
            with on_device(present, device):
                yield
        finally:
            self.weights.release(loaded)

    def each_layer_materialized(self) -> Iterator[DecoderLayer]:
        """The layers in order, each loaded while the caller works on it and released after;
        the next layer is read in a background thread meanwhile (file reads and the NaN check
        release the GIL), so reading overlaps whatever the caller does: writing, for the exporter.

        At most two layers are loaded at once. A graph loaded in memory just yields its layers.
        Each layer the caller is done with is counted (`surgery.progress.advance`), so any pass
        run under `counted(..., unit="layer")` shows how far it is.
        """
        if self.weights is None:
            for layer in self.layers:
                yield layer
                advance("layer")
            return
        weights = self.weights

        def load(layer: DecoderLayer):
            return weights.materialize(unique_parameters(layer.modules()))

        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(load, self.layers[0]) if self.layers else None
            try:
                for position, layer in enumerate(self.layers):
                    loaded = pending.result()
                    pending = None
                    if position + 1 < len(self.layers):
                        pending = reader.submit(load, self.layers[position + 1])
                    try:
                        yield layer
                    finally:
                        weights.release(loaded, recycle=pending is not None)
                    advance("layer")
            finally:
                if pending is not None:  # stopped early: the read ahead is not needed
                    with contextlib.suppress(Exception):
                        weights.release(pending.result())
                weights.checkpoint.drop_recycled()

    def spill_rewritten(self, layer: DecoderLayer, folder: Path) -> int:
        """After a pass rewrote `layer` in memory, write its new parameters (loaded, but held by
        no checkpoint) to a safetensors file in `folder` and release them; returns their bytes.
        Parameters the checkpoint holds are left to whoever loaded them. The file is named for
        the layer and a counter, so a layer rewritten twice (prune, then merge) keeps both."""
        fresh: dict[str, torch.nn.Parameter] = {}
        seen: set[int] = set()
        for position, module in enumerate(layer.modules()):
            for name, param in module.named_parameters():
                if id(param) in seen or param.device.type == "meta" or self.weights.knows(param):
                    continue
                seen.add(id(param))
                fresh[f"rewritten.{self._spills}.layers.{layer.index}.{position}.{name}"] = param
        if not fresh:
            return 0
        size = sum(param.nbytes for param in fresh.values())
        self.weights.spill(fresh, folder / f"layer-{layer.index}-{self._spills}.safetensors")
        self._spills += 1
        return size

    def materialize_all(self) -> None:
        """Load every parameter still in the checkpoint, for good (steps that need the whole model)."""
        if self.weights is not None:
            self.weights.materialize(unique_parameters(self.all_modules()))

    @property
    def tied_head(self) -> bool:
        """Whether the head is the embedding table itself."""
        return self.head.tied

    # Structure queries used by passes, the exporter and the report.

    def layer(self, index: int) -> DecoderLayer | None:
        """The layer with original number `index`, or None if its block was dropped."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        return None

    def kv_layers(self) -> list[int]:
        """Original numbers of the layers that keep attention, in order: KV slot k -> layer."""
        return [layer.index for layer in self.layers if layer.has_attention]

    def conv_layers(self) -> list[int]:
        """Original numbers of the layers with a short convolution (LFM2), in order: convolution
        state k -> layer."""
        return [layer.index for layer in self.layers if layer.has_conv]

    def parameter_count(self) -> int:
        """Parameters still reachable from the graph (a tied head counts once)."""
        return sum(p.numel() for p in unique_parameters(self.all_modules()))

    def to_dtype(self, dtype: torch.dtype) -> None:
        """Cast every parameter the graph computes with to `dtype`, in place (the reference forward
        then runs in the export's element type). Buffers such as RoPE frequencies stay fp32, as
        the exporter computes its rotary tables in fp32 too."""
        modules: list[torch.nn.Module] = [self.model, self.embedding, self.head]
        for layer in self.layers:
            modules += layer.modules()
        seen: set[int] = set()
        for module in modules:
            for parameter in module.parameters():
                if id(parameter) not in seen and parameter.is_floating_point():
                    seen.add(id(parameter))
                    parameter.data = parameter.data.to(dtype)

    # The reference forward.

    def new_cache(self) -> KVCache:
        """An empty KV cache with one slot per kept attention layer (and one convolution state per
        short-convolution layer)."""
        slots = len(self.kv_layers())
        return KVCache(keys=[None] * slots, values=[None] * slots, convs=[None] * len(self.conv_layers()))

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logit lens: the head (final norm included) applied to any residual."""
        return self.head(hidden)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        observer: ResidualObserver | None = None,
        logits: bool = True,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab). `attention_mask` covers past + new tokens (1 = real token).

        `observer(layer, x, m, h)` sees each layer's residual stream: entering the layer (x),
        after attention (m) and leaving it (h), which is what importance metrics read. With
        `logits=False` the head is skipped and the last residual is returned.
        """
        fused = set(self.fusion.layers) if self.fusion is not None and logits else set()
        residuals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        run = ReferenceSequence(input_ids, attention_mask, position_ids, cache)
        hidden = self.embedding(input_ids)
        for layer in self.layers:
            hidden, after_attention = run.through(layer, hidden, self.rotary, observer)
            if layer.index in fused:
                residuals[layer.index] = (after_attention, hidden)
        if not logits:
            return hidden
        if self.fusion is not None:
            fused_out, self.last_choice = fused_logits(self, self.fusion, hidden, residuals)
            return fused_out
        return self.head(hidden)

    @torch.no_grad()
    def forward_layerwise(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        observer: ResidualObserver | None = None,
        logits: bool = True,
        variants: list[Callable[[DecoderLayer | None], contextlib.AbstractContextManager]] | None = None,
        reduce: Callable[[int, torch.Tensor], Any] | None = None,
        device: str | None = None,
    ) -> list[Any]:
        """`forward` of many batches (input ids, mask, positions), run layer-major: each layer is
        loaded once (`each_layer_materialized`), every batch's hidden state goes through it, and
        it is released. This is how a model larger than memory is scored or verified: what is
        held is one or two layers plus the hidden states of the batches, never the model. The
        arithmetic is `forward`'s, batch for batch, so the results are identical.

        `variants[i]`, when given, wraps batch i's pass through each layer (called with the
        embedding module, its lookup; with None, the head): verification uses it to compute with
        the written quantized weights. `reduce(i, logits)`, when given, takes batch i's logits as soon as they are
        computed and its result is returned instead, so only one batch's logits exist at a time
        (a perplexity over 16 windows of a 152k vocabulary would otherwise hold 5 GB).
        Dynamic layer fusion needs every readout at once and is not supported here.

        With `device` (e.g. "cuda"), this is sequential onloading: the hidden states live on that
        device and each layer is moved there while it runs, so one accelerator scores a model
        far larger than its memory. Returned hidden states and logits are on that device.
        """
        if self.fusion is not None and logits:
            raise ValueError("layer-major forward does not run layer fusion")
        variants = variants or [lambda _: contextlib.nullcontext()] * len(batches)
        if device is not None:
            batches = [tuple(t.to(device) for t in batch) for batch in batches]  # type: ignore[misc]
        runs = [ReferenceSequence(ids, mask, positions) for ids, mask, positions in batches]
        hidden = []
        with self.materialized(self.embedding, device=device):
            for i, (ids, _, _) in enumerate(batches):
                with variants[i](self.embedding):
                    hidden.append(self.embedding(ids))
        with on_device([self.rotary.module] if self.rotary is not None else [], device):
            for layer in self.each_layer_materialized():
                with on_device(layer.modules(), device):
                    for i, run in enumerate(runs):
                        with variants[i](layer):
                            hidden[i], _ = run.through(layer, hidden[i], self.rotary, observer)
        if not logits:
            return hidden
        with self.materialized(self.head.final_norm, self.head, device=device):
            out = []
            for i in range(len(hidden)):
                with variants[i](None):
                    logits = self.head(hidden[i])
                hidden[i] = None  # type: ignore[call-overload]  # this batch is done
                out.append(logits if reduce is None else reduce(i, logits))
            return out


class ReferenceSequence:
    """One batch's pass through the layers in PyTorch: the reference forward's side of the layer
    walk (`surgery.ir.layer`). It holds the batch's masks and rotary tables (built on first
    use per window and RoPE kind), its KV cache, the next cache slot, and the residual."""

    def __init__(self, input_ids, attention_mask, position_ids, cache: KVCache | None = None):
        self.input_ids, self.attention_mask, self.position_ids, self.cache = (
            input_ids, attention_mask, position_ids, cache)  # fmt: skip
        self.past = cache.length() if cache is not None else 0
        self.tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks: dict[int | None, torch.Tensor] = {}
        self.slot = 0
        self.conv_slot = 0
        self.rotary = None
        self.hidden: torch.Tensor | None = None
        self.after: torch.Tensor | None = None  # the residual after the current layer's attention

    def through(self, layer: DecoderLayer, hidden: torch.Tensor, rotary, observer: ResidualObserver | None):
        """(the residual leaving `layer`, the residual after its attention)."""
        self.hidden, self.rotary = hidden, rotary
        walk_layer(layer, self)
        out, after = self.hidden, self.after
        self.hidden = self.after = None  # this object holds no activations between layers
        if observer is not None:
            observer(layer.index, hidden, after, out)
        return out, after

    # The residual stream (surgery.ir.layer.ResidualStream), computed.

    def pre(self, norm: RMSNorm | None, name: str) -> torch.Tensor:
        """The residual, normalized when the family has a pre-norm here."""
        return norm(self.hidden) if norm is not None else self.hidden

    def attention(self, node: Attention | ShortConv, x: torch.Tensor, name: str) -> torch.Tensor:
        """The attention on `x` with this batch's rotary table, mask and next cache slot (or the
        short convolution on its next convolution state)."""
        if isinstance(node, ShortConv):
            state = (self.cache, self.conv_slot) if self.cache is not None else None
            self.conv_slot += 1
            return node(x, self.attention_mask[:, self.attention_mask.shape[1] - x.shape[1] :], state)
        if node.rope not in self.tables:  # a NoPE layer reads none
            self.tables[node.rope] = (None if node.rope == NO_ROPE
                                      else self.rotary.cos_sin(self.hidden, self.position_ids, node.rope))  # fmt: skip
        window = node.sliding_window
        if window not in self.masks:
            self.masks[window] = attention_bias(
                self.attention_mask, self.input_ids.shape[1], self.past, window, self.hidden.dtype
            )
        slot_cache = (self.cache, self.slot) if self.cache is not None else None
        self.slot += 1
        return node(x, self.tables[node.rope], self.masks[window], slot_cache)

    def mlp(self, node: torch.nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
        """The MLP (dense or experts) on `x`."""
        return node(x)

    def post(self, norm: RMSNorm | None, update: torch.Tensor, name: str, scale: float) -> torch.Tensor:
        """The update after the post-norm and the residual multiplier, where the family has them."""
        if norm is not None:
            update = norm(update)
        return update * scale if scale != 1.0 else update

    def add(self, update: torch.Tensor) -> None:
        """residual += update."""
        self.hidden = self.hidden + update

    def after_attention(self, layer: DecoderLayer) -> None:
        """Keep the residual after attention (the layer's "m")."""
        self.after = self.hidden

    def after_layer(self, layer: DecoderLayer) -> None:
        """Nothing: `through` hands the residual back."""
