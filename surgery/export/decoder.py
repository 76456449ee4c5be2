"""Emit the edited decoder graph as an ONNX model built on onnxruntime's fused operators.

Why not trace: the layers of a decoder share their structure, so the graph of a layer is a
function of its *kind* (attention kept?, MLP kept?, which extras the architecture has) and
its weights. Emitting that structure directly and stamping each layer's weights into it makes
export cost linear in the weights alone (a few seconds, no tracer), and lets every layer use
the fused kernels that make onnxruntime fast on CPU:

- one packed QKV `MatMul` feeding `GroupQueryAttention` (com.microsoft) directly, which splits
  it, applies RoPE, concatenates the KV cache and attends with grouped heads without
  repeat_kv copies;
- `SkipSimplifiedLayerNormalization`: each residual add is fused with the next RMSNorm;
- `MatMul` against pre-transposed weights; SwiGLU as Sigmoid*Mul.

Left padding is honoured: `seqlens_k` is the full padded length for every row and the padding
is an additive `attention_bias`. Rotary positions are the index in the padded sequence
(prompt: 0..S-1, decode: the past length), which GroupQueryAttention derives itself. For a
left-padded row the true positions are that index minus the row's padding, a constant shift,
and RoPE attention depends only on position differences, so the logits are those of the
model fed true positions (verification checks exactly this case). The model therefore has no
`position_ids` input. `export onnx with position-ids` adds one for callers with other
positions (packed sequences, gaps): RoPE is then applied by `RotaryEmbedding` nodes on the
split Q and K before attention, which costs 3-5% of a decode step.
(onnxruntime's GroupQueryAttention refuses batch > 1 with both a past and several new tokens;
prefill and one-token decode, the generation loop's two steps, work at any batch size.)
A dropped attention emits nothing and has no KV input or output; KV slots are numbered
compactly over the kept attention layers. A short convolution in the attention's place (LFM2)
carries a fixed state instead, `past.<slot>.conv` -> `present.<slot>.conv`, numbered after the KV
slots. Correctness is not assumed: `surgery.backend.verify`
compares this graph against `DecoderGraph.forward` in PyTorch after every apply.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
from onnx import TensorProto

from surgery.export.options import ExportOptions
from surgery.export.shared_inputs import SharedInputs
from surgery.export.writer import GraphWriter
from surgery.formats.weights import WeightFormat
from surgery.ir.graph import DecoderGraph
from surgery.ir.layer import DecoderLayer, walk_layer
from surgery.nodes.norm import RMSNorm
from surgery.nodes.short_conv import ShortConv

# The element type every component writes (weights, activations, KV cache and logits) is the
# export's one `Precision` record (surgery.formats.precision), read by every component.


@dataclass(frozen=True)
class ExportResult:
    """What was written: paths, KV layout, and graph statistics for the report."""

    model_path: str
    data_path: str
    kv_layers: tuple[int, ...]
    parameter_count: int
    op_counts: dict[str, int]
    linears: dict[str, str]  # linear layer ("model.layers.3.mlp.up_proj", "lm_head") -> its MatMul node
    context_length: int = 0  # positions the rotary tables cover: the longest sequence the model takes


class _Emitter:
    """The exporter's side of the layer walk (`surgery.ir.layer`): its residual stream is a
    value name plus the pending residual update, which the next norm fuses
    (SkipSimplifiedLayerNormalization) instead of a separate Add.

    Every node emits itself (`surgery.nodes`: attention, MLPs, MoE, the head; layer fusion in
    `surgery.nodes.fusion`); the emitter owns the graph's inputs, the attention context every
    attention layer shares, and the stream.
    """

    def __init__(
        self, graph: DecoderGraph, writer: GraphWriter, options: ExportOptions, calibrated: dict | None = None
    ):
        self.graph, self.w, self.options = graph, writer, options
        self.calibrated = calibrated or {}  # linear -> GPTQ blocks (surgery.analysis.calibrated_quantization)
        self.element = options.element
        self.dtype, self.onnx_type = self.element.numpy_dtype(), self.element.onnx_type
        self.residual = ""
        self.pending: str | None = None  # a sub-block's output not yet added to the residual
        self.linears: dict[str, str] = {}
        self.quantized = dict(options.quantize_linears)  # linear -> WeightFormat
        self.written: dict[str, list[str]] = {}  # linear -> its blocks' tensors, written ahead of its node
        self.context_length = int(graph.config.max_position_embeddings)
        self.slot = 0  # the next KV cache slot
        fusion = graph.fusion
        self.fusion = fusion if fusion is not None and fusion.weight > 0 else None
        self.readouts: dict[int, tuple[str | None, str]] = {}  # fused layer -> FinalNorm(m), FinalNorm(h)
        self.readout_before_mlp: str | None = None

    def quantizes(self, linear: str) -> bool:
        """Whether the options assign `linear` a weight format."""
        return linear in self.quantized

    def array(self, tensor: torch.Tensor) -> np.ndarray:
        """A tensor as a numpy array in the export's element type."""
        return tensor.detach().to(torch.float32).cpu().numpy().astype(self.dtype, copy=False)

    def linear(
        self,
        linear: str,
        x: str,
        weight: torch.Tensor,
        weight_name: str,
        node: str,
        output: str | None = None,
        parameter: bool = True,
    ) -> str:
        """`x @ weight.T` for the linear layer `linear`, recorded as `node` for quantization passes.
        `parameter=False`: the weight is counted elsewhere (a tied head written on its own).

        A float MatMul against the transposed weight, or, when the options assign this linear a
        weight format, the format's node written straight from the float weight (its `emit_linear`):
        the quantized model is produced in one streaming pass, holding one weight at a time.
        """
        self.linears[linear] = node
        # The MatMul's output name either way, as the quantize pass keeps it.
        outputs = [output or f"{node}/output_0"]
        stored = self.quantized.get(linear)
        if stored is None:
            operand = self.w.weight(weight_name, self.array(weight).T, parameter=parameter)
            return self.w.node("MatMul", [x, operand], node, outputs)[0]
        tensors = self.written.get(linear)  # a tied head whose blocks the embedding's lookup wrote
        blocks = None if tensors else self.blocks(linear, weight)
        n, k = weight.shape
        if parameter:
            self.w.parameter_count += n * k  # the float parameters these blocks stand for
        return stored.emit_linear(self.w, x, weight_name, blocks, node, outputs, n, k, self.options.accuracy_level,
                                  tensors, self.onnx_type)  # fmt: skip

    def blocks(self, linear: str, weight: torch.Tensor):
        """A quantized linear's blocks: the calibrated ones when the recipe's rounding read data
        (GPTQ, weighted grids), else rounded to nearest; scales in the element type, as the
        quantizer writes them (or in fp16, when the format says so)."""
        blocks = self.calibrated.get(linear)
        stored = self.quantized[linear]
        if blocks is None:
            blocks = stored.quantize(weight)
        return replace(blocks, scales=blocks.scales.astype(stored.scale_dtype(self.dtype), copy=False))

    def quantized_lookup(self, table: torch.Tensor, ids: str, stored: WeightFormat) -> str:
        """The embedding's GatherBlockQuantized, written from the float table as it is exported.

        When the head is tied and written in the same format, its MatMulNBits tensors are
        written now (named as the head's) and the lookup reads them through Reshapes; the head
        then reuses them, so the vocabulary matrix is stored once. Otherwise the table's own
        blocks, named `model.embed_tokens.weight_Q<bits>`, `_scales`, `_zero_points` (what
        surgery.passes.quantize_embedding writes after export).
        """
        rows, hidden = table.shape
        shares = self.graph.tied_head and self.quantized.get("lm_head") == stored
        if shares:
            blocks = self.blocks("lm_head", table)
            tensors = self.written["lm_head"] = stored.write_blocks(self.w, "lm_head.weight", blocks, self.onnx_type)
        else:
            blocks = stored.quantize(table).as_rows()
            blocks = replace(blocks, scales=blocks.scales.astype(stored.scale_dtype(self.dtype), copy=False))
            tensors = stored.write_blocks(self.w, "model.embed_tokens.weight", blocks, self.onnx_type)  # fmt: skip
        self.w.parameter_count += rows * hidden  # the float parameters these blocks stand for
        return stored.emit_lookup(self.w, tensors, ids, rows, hidden, views=shares)

    def scalar(self, value: float) -> str:
        """A scalar constant in the element type."""
        return self.w.constant(value, self.dtype)

    # Residual stream bookkeeping.

    def pre(self, norm: RMSNorm | None, name: str, scale: float | None = None, derived: bool = True) -> str:
        """The input of a sub-block (or head): the residual with the pending update added, normalized
        when the family has a norm here. Adding and normalizing is one fused node.

        `scale` multiplies the gain: layer fusion folds its mixing weights into the final norm's
        gain this way. The scaled copies read for fused layers are `derived` (not parameters).
        """
        if norm is None:
            if self.pending is not None:
                self.residual = self.w.op("Add", [self.residual, self.pending], f"/{name}/residual_add")
                self.pending = None
            return self.residual
        if scale is None:
            gamma = self.w.weight(f"{name}.weight", norm.gain(self), parameter=norm.has_weight)
        else:
            gamma = self.w.weight(f"{name}.weight_x{scale:g}", norm.gain(self, scale), parameter=not derived)
        if self.pending is None:
            return norm.emit(self, self.residual, name, gamma, scale=scale or 1.0)
        out, self.residual = norm.emit_skip(self, self.pending, self.residual, name, gamma, scale=scale or 1.0)
        self.pending = None
        return out

    def post(self, norm: RMSNorm | None, update: str, name: str, scale: float) -> str:
        """A sub-block's update: its post-norm (Gemma 3, OLMo 2) and residual multiplier (Granite)."""
        if norm is not None:
            update = norm.emit(self, update, name)
        if scale != 1.0:
            update = self.w.op("Mul", [update, self.scalar(scale)], f"/{name}/residual_scale")
        return update

    def attention(self, node, x: str, name: str) -> str:
        """The attention's nodes, on the next KV slot (or a short convolution's, on its next state)."""
        if isinstance(node, ShortConv):
            slot, self.state_slot = self.state_slot, self.state_slot + 1
            conv_name = name.rsplit(".", 1)[0] + ".conv"
            past, present = f"past.{slot}.conv", f"present.{slot}.conv"
            if not self.options.kv_cache:  # no state in or out: every call starts from zeros
                past, present = "", f"/{conv_name}/present_state"
            # The CUDA form's mask spans genai's whole static buffer (padding on the right), so its
            # last columns are not the new tokens'; right padding never reaches a causal convolution.
            new_mask = None if self.options.target == "cuda" else self.shared.new_token_mask()
            return node.emit(self, x, conv_name, new_mask, past, present)
        self.slot += 1
        return node.emit(self, x, name, self.shared, self.slot - 1)

    def mlp(self, node, x: str, name: str) -> str:
        """The MLP's nodes (dense or a mixture of experts: each emits itself)."""
        return node.emit(self, x, name)

    def add(self, update: str) -> None:
        """The update waits for the next norm, which adds it (one fused node)."""
        self.pending = update

    def after_attention(self, layer: DecoderLayer) -> None:
        """Dynamic layer fusion reads a fused layer's residual after attention here."""
        self.readout_before_mlp = None
        if self.fusion is not None and layer.mlp is not None:
            self.readout_before_mlp = self.fusion.emit_readout_before_mlp(self, self.graph.head.final_norm, layer.index)

    def after_layer(self, layer: DecoderLayer) -> None:
        """Layer fusion reads a fused layer's residual leaving it here."""
        if self.fusion is not None:
            readout = self.fusion.emit_readout(self, self.graph.head.final_norm, layer.index)
            if readout is not None:
                self.readouts[layer.index] = (self.readout_before_mlp, readout)

    # Graph inputs and the pieces every attention layer shares.

    def inputs(self) -> None:
        w = self.w
        self.input_ids = w.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        self.attention_mask = w.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        self.shared = SharedInputs(self)
        if self.options.position_ids:
            self.shared.position_ids = w.add_input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        self.kv_layers = self.graph.kv_layers()
        # A short-convolution layer's state (LFM2) is numbered after the KV slots: state slot
        # len(kv_layers) + k belongs to the k-th convolution layer (genai's `layer_types` says so).
        self.state_slot = len(self.kv_layers)  # the next convolution state's slot
        convs = [self.graph.layer(i).attention for i in self.graph.conv_layers()]
        for slot, node in enumerate(convs if self.options.kv_cache else (), start=self.state_slot):
            shape = ["batch_size", node.channels, node.state_width]
            w.add_input(f"past.{slot}.conv", self.onnx_type, shape)
            w.add_output(f"present.{slot}.conv", self.onnx_type, shape)
        if not self.options.kv_cache:
            return
        nodes = [self.graph.layer(i).attention for i in self.kv_layers]
        # Head counts and sizes are per layer, and so is a quantized cache's type and packing.
        stored = [self._cache_type(node) for node in nodes]
        for slot, (node, (element, size)) in enumerate(zip(nodes, stored, strict=True)):
            for kind in ("key", "value"):
                shape = ["batch_size", node.num_kv_heads, "past_sequence_length", size]
                w.add_input(f"past_key_values.{slot}.{kind}", element, shape)
        for slot, (node, (element, size)) in enumerate(zip(nodes, stored, strict=True)):
            for kind in ("key", "value"):
                shape = ["batch_size", node.num_kv_heads, "total_sequence_length", size]
                w.add_output(f"present.{slot}.{kind}", element, shape)

    def _cache_type(self, node) -> tuple[int, int]:
        """(element type, last dimension) of one layer's past and present tensors."""
        if node.kv_quant is None:
            return self.onnx_type, node.head_dim
        cache = node.kv_quant.format
        return cache.onnx_type, cache.stored_head_dim(node.head_dim)

    def attention_context(self) -> None:
        """seqlens_k, total_sequence_length and the padding bias shared by every attention.

        CPU form: every row counts as full length and an additive bias masks the padding, so any
        padding (left, as transformers pads) is exact. CUDA form: no bias, `seqlens_k` = the
        mask's sum - 1 per row, as onnxruntime-genai's builder does: GroupQueryAttention's fused
        CUDA kernels then run, and the KV cache may share one buffer between past and present
        (genai's `past_present_share_buffer`); padding must be on the right, which is how genai
        batches. Measured on an H200 (Llama-3.2-1B shape, decode at 256 / 2048 tokens): 2.30 /
        2.73 ms per token with the bias, 1.67 / 1.70 ms in the CUDA form.
        """
        w, c, shared = self.w, self.w.constant, self.shared
        name = "/model/attention_context"
        mask_shape = w.op("Shape", [self.attention_mask], f"{name}/mask_shape")
        batch = w.op("Gather", [mask_shape, c([0])], f"{name}/batch")
        total = w.op("Gather", [mask_shape, c([1])], f"{name}/total")
        shared.total_len = w.op("Cast", [total], f"{name}/total_int32", to=TensorProto.INT32)
        if self.options.target == "cuda":
            count = w.op("ReduceSum", [self.attention_mask, c([1])], f"{name}/mask_sum", keepdims=0)
            count = w.op("Sub", [count, c(1)], f"{name}/mask_last")
            shared.seqlens_k = w.op("Cast", [count], f"{name}/seqlens_k", to=TensorProto.INT32)
            shared.bias = ""
            return
        # Every row is treated as full length; padding is excluded by the bias instead.
        last = w.op("Sub", [shared.total_len, c(1, np.int32)], f"{name}/last")
        shared.seqlens_k = w.op("Expand", [last, batch], f"{name}/seqlens_k")
        # Padding bias by lookup (mask 0 -> the element type's mask value, 1 -> 0), as (batch, 1, query, key):
        # GroupQueryAttention broadcasts over heads but wants every query row.
        mask_value = self.element.mask_value
        bias = w.op("Gather", [c([mask_value, 0.0], self.dtype), self.attention_mask], f"{name}/bias_2d")
        bias = w.op("Unsqueeze", [bias, c([1, 2])], f"{name}/bias_4d")
        seq = w.op("Gather", [w.op("Shape", [self.input_ids], f"{name}/ids_shape"), c([1])], f"{name}/seq")
        target = w.op("Concat", [batch, c([1]), seq, total], f"{name}/bias_shape", axis=0)
        shared.bias = w.op("Expand", [bias, target], f"{name}/attention_bias")

    # The whole model.

    def emit(self) -> None:
        """The whole model: inputs, attention context, embedding, layers, head."""
        graph = self.graph
        self.inputs()
        if self.kv_layers:
            self.attention_context()
        # Weights are loaded a node at a time (lazily loaded models) and released once written.
        # The writer copies every weight into blocks of its own, so a node's weights may be
        # released once emitted; each flush raises a failed write (a full disk) early.
        with graph.materialized(graph.embedding):
            self.residual, embed = graph.embedding.emit(self, self.input_ids)
            self.w.flush()
        with graph.materialized(graph.head.final_norm):
            self.layers_and_head(embed)

    def layers_and_head(self, embed: str) -> None:
        """Every layer (the layer walk), then the head (layer fusion's mix included)."""
        graph = self.graph
        names = graph.architecture.names
        for layer in graph.each_layer_materialized():
            walk_layer(layer, self, names)
            self.w.flush()
        # A head stored apart from the embedding is loaded for its MatMul; a shared table is not.
        shares_table = graph.tied_head and not self.options.untie_head
        with graph.materialized(None if shares_table else graph.head):
            graph.head.emit(self, embed, graph.index.vocab_size, self.fusion, self.readouts)
            self.w.flush()


def export_decoder(
    graph: DecoderGraph, folder: str, options: ExportOptions | None = None, calibrated: dict | None = None
) -> ExportResult:
    """Write `model.onnx` and `model.onnx.data` for the graph into `folder`."""
    options = options or ExportOptions()
    model_path = os.path.join(folder, "model.onnx")
    writer = GraphWriter(os.path.join(folder, "model.onnx.data"))
    try:
        emitter = _Emitter(graph, writer, options, calibrated)
        emitter.emit()
    except BaseException:
        writer.close()
        raise
    kv_layers = tuple(graph.kv_layers())
    metadata = {
        "surgery.kv_layers": json.dumps(list(kv_layers)),
        "surgery.layers": json.dumps([layer.index for layer in graph.layers]),
        "surgery.kv_cache": json.dumps(options.kv_cache),
    }
    writer.save(model_path, options.opset, metadata, graph_name=graph.index.name)
    return ExportResult(
        model_path=model_path,
        data_path=writer.data_path,
        kv_layers=kv_layers,
        parameter_count=writer.parameter_count,
        op_counts=dict(Counter(node.op_type for node in writer.nodes)),
        linears=dict(emitter.linears),
        context_length=emitter.context_length,
    )
