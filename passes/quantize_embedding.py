"""`quantize embedding to int4|int8 [block N] [symmetric]`: the vocabulary table in blocks.

Graph effect: the token embedding's `Gather` over the float table becomes a
`GatherBlockQuantized` (com.microsoft) over `bits`-wide blocks of each row with per-block
scales (and zero points unless symmetric); the float table is removed. Why: the embedding is
the largest single tensor of a small model (113 MB of SmolLM2's 540 MB in fp32; most of a
150k-vocabulary model's file), and a lookup needs no float copy of the rows it never reads.

The blocks are laid out as MatMulNBits lays out the tied head's weight (row = token, blocks
along the hidden axis, the same packing, scales and zero points), so when the head is tied
and quantized with the same width, block and symmetry, the lookup reads the head's tensors
(reshaped views) and the vocabulary matrix is stored once. Otherwise the table is quantized
with onnxruntime's own MatMulNBits packing routine into tensors of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from surgery.analysis.quantization import producers_of, read_through_cast
from surgery.formats.weights import EMBEDDING_GATHER, WeightFormat, lookup_shapes
from surgery.passes.base import OnnxPass, PassResult
from surgery.passes.quantize import FLOAT_TYPES

HEAD_NODE = "/lm_head/MatMul"


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass(frozen=True)
class QuantizeEmbedding(OnnxPass):
    """Replace the embedding Gather by GatherBlockQuantized in `stored`'s format; share a tied head's
    tensors when the head is quantized to the same format."""

    name: ClassVar[str] = "quantize embedding"
    preserves_semantics: ClassVar[bool] = False
    stored: WeightFormat
    tied_head: bool = False  # the model ties its head to the embedding (the head's weight is the table)

    def parameters(self) -> dict:
        """The format's fields (bits, block, symmetric) and whether the head is tied, as plain data."""
        return {**self.stored.to_json(), "tied_head": self.tied_head}

    def _gather(self, model: onnx.ModelProto) -> onnx.NodeProto | None:
        return next((n for n in model.graph.node if n.name == EMBEDDING_GATHER and n.op_type == "Gather"), None)

    def requires(self, model: onnx.ModelProto) -> list[str]:
        """The embedding Gather reads a 2-D float initializer whose rows split into whole blocks."""
        gather = self._gather(model)
        if gather is None:
            return [f"no Gather named {EMBEDDING_GATHER}"]
        table = next((i for i in model.graph.initializer if i.name == gather.input[0]), None)
        if table is None or len(table.dims) != 2 or table.data_type not in FLOAT_TYPES:
            return ["the embedding table is not a 2-D fp32 or fp16 initializer"]
        problems = list(self.stored.problems())
        if table.dims[1] % self.stored.block:
            problems.append(f"hidden size {table.dims[1]} is not a multiple of block {self.stored.block}")
        return problems

    def _shared_head(self, model: onnx.ModelProto, rows: int, hidden: int) -> list[str] | None:
        """The quantized head's (weight, scales[, zero points]) if the lookup can read them."""
        if not self.tied_head:
            return None
        head = next((n for n in model.graph.node if n.name == self.stored.node_name(HEAD_NODE)), None)
        if head is None or head.op_type != "MatMulNBits":
            return None
        a = _attributes(head)
        has_zero_points = len(head.input) > 3 and head.input[3] != ""
        half = read_through_cast(head.input[2], producers_of(model.graph))
        if WeightFormat.of_node(a, has_zero_points, half) != self.stored or (a.get("K"), a.get("N")) != (hidden, rows):
            return None
        return list(head.input[1 : 4 if has_zero_points else 3])

    def apply(self, model: onnx.ModelProto) -> PassResult:
        """Swap the Gather for GatherBlockQuantized over shared or new quantized tensors."""
        graph = model.graph
        gather = self._gather(model)
        table_name, ids = gather.input[0], gather.input[1]
        table_init = next(i for i in graph.initializer if i.name == table_name)
        rows, hidden = (int(d) for d in table_init.dims)
        blocks = hidden // self.stored.block
        shared = self._shared_head(model, rows, hidden)
        new_nodes = []
        if shared is not None:
            # Views of the head's tensors in the lookup's shapes: [rows, blocks * blob], [rows, blocks], ...
            shapes = lookup_shapes(rows, blocks)
            inputs = []
            for position, (tensor, shape) in enumerate(zip(shared, shapes, strict=False)):
                shape_name = f"{EMBEDDING_GATHER}/shape_{position}"
                graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
                view = f"{EMBEDDING_GATHER}/view_{position}"
                new_nodes.append(helper.make_node("Reshape", [tensor, shape_name], [view], name=view))
                inputs.append(view)
            how = "shares the tied head's quantized tensors"
        else:
            table = numpy_helper.to_array(table_init, base_dir="")
            packed, scales, zero_points = self.stored.quantize_table(table.astype(np.float32))
            # the lookup returns rows in the scales' type: fp16 ones are read through a Cast
            scales = scales.astype(self.stored.scale_dtype(table.dtype))
            base = self.stored.node_name(table_name)
            tensors = [(packed, base), (scales, f"{base}_scales")]
            if zero_points is not None:
                tensors.append((zero_points, f"{base}_zero_points"))
            for array, name in tensors:
                graph.initializer.append(numpy_helper.from_array(array, name))
            inputs = [name for _, name in tensors]
            if scales.dtype != table.dtype:
                cast = f"{base}_scales/Cast"
                new_nodes.append(helper.make_node("Cast", [inputs[1]], [cast], name=cast,
                                                  to=helper.np_dtype_to_tensor_dtype(table.dtype)))  # fmt: skip
                inputs[1] = cast
            how = "in tensors of its own"
        data, *rest = inputs
        quantized = helper.make_node(
            "GatherBlockQuantized",
            [data, ids, *rest],
            list(gather.output),
            name=f"{EMBEDDING_GATHER}BlockQuantized",
            domain="com.microsoft",
            **self.stored.node_attributes(),
            gather_axis=0,
            quantize_axis=1,
        )
        position = list(graph.node).index(gather)
        graph.node.remove(gather)
        for offset, node in enumerate([*new_nodes, quantized]):
            graph.node.insert(position + offset, node)
        if not any(table_name in node.input for node in graph.node):
            graph.initializer.remove(table_init)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        stored = self.stored
        return PassResult(True, f"embedding to {stored.describe('GatherBlockQuantized')}, {how}")

    def ensures(self, model: onnx.ModelProto) -> list[str]:
        """The lookup is block-quantized at the asked width and no float table is left for it."""
        nodes = [n for n in model.graph.node if n.name == f"{EMBEDDING_GATHER}BlockQuantized"]
        if len(nodes) != 1 or nodes[0].op_type != "GatherBlockQuantized":
            return ["the embedding lookup was not replaced"]
        a = _attributes(nodes[0])
        problems = []
        if {key: a.get(key) for key in self.stored.node_attributes()} != self.stored.node_attributes():
            problems.append(f"the lookup has bits {a.get('bits')} block {a.get('block_size')}")
        if any(n.name == EMBEDDING_GATHER for n in model.graph.node):
            problems.append("the float embedding Gather is still there")
        return problems
