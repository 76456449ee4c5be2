"""`quantize <part> <selector> to int4|int8 [block N] [symmetric]`: weight-only MatMulNBits.

Graph effect: each selected linear layer's `MatMul` against a float weight becomes a
`MatMulNBits` (com.microsoft) node holding the weight in `bits`-wide blocks with per-block
scales (and zero points unless symmetric), computed with int8 activations on CPU
(accuracy_level 4). Nothing else changes. Why: weights dominate a small decoder's memory
traffic, and layers differ in how much precision they need, so widths follow importance.

The conversion is onnxruntime's own `MatMulNBitsQuantizer`. Its `nodes_to_include` does not
restrict the selection (it only adds to the op-type match), so selection is by exclusion:
one quantizer run per (bits, block, symmetric) setting, excluding every MatMul not assigned
that setting. `ensures` checks the outcome node by node: exactly the assigned MatMuls became
`<name>_Q<bits>` with the right width and block, and every other MatMul is untouched.

A format with fp16 scales (`WeightFormat.half_scales`) is then rewritten weight by weight from
the float weight, as the exporter writes it (`write_scales_in_fp16`): the codes on grids whose
scales are fp16 values, the scales stored in fp16 and read through a Cast to the activations'
type unless that is fp16.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from surgery.analysis.quantization import producers_of, stored_tensor
from surgery.formats.weights import WeightFormat
from surgery.passes.base import OnnxPass, PassResult

ACCURACY_LEVEL = 4  # int8 activations: the fast CPU path
ACCURACY_LEVELS = {"cpu": ACCURACY_LEVEL, "cuda": 0}  # per export target: CUDA computes in the float type
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # weights the quantizer reads


@dataclass(frozen=True)
class Quantize(OnnxPass):
    """Convert the named MatMul nodes to MatMulNBits; `assignment` is (node, its WeightFormat).

    `accuracy_level` 4 computes with int8 activations (fast on CPU); 0 computes in float with
    the dequantized weights, which tests use for exact parity with PyTorch.
    """

    name: ClassVar[str] = "quantize"
    preserves_semantics: ClassVar[bool] = False
    assignment: tuple[tuple[str, WeightFormat], ...]
    accuracy_level: int = ACCURACY_LEVEL

    def parameters(self) -> dict:
        """The assignment (node, format as plain data) and the accuracy level."""
        return {
            "assignment": [[node, stored.to_json()] for node, stored in self.assignment],
            "accuracy_level": self.accuracy_level,
        }

    def requires(self, model: onnx.ModelProto) -> list[str]:
        """Every assigned node is a MatMul whose weight is a 2-D float initializer, assigned once."""
        nodes = {node.name: node for node in model.graph.node}
        weights = {init.name: init for init in model.graph.initializer}
        problems = []
        seen = set()
        for node_name, stored in self.assignment:
            if node_name in seen:
                problems.append(f"{node_name} is assigned twice")
            seen.add(node_name)
            node = nodes.get(node_name)
            if node is None or node.op_type != "MatMul":
                problems.append(f"{node_name} is not a MatMul of the model")
                continue
            weight = weights.get(node.input[1])
            if weight is None or len(weight.dims) != 2 or weight.data_type not in FLOAT_TYPES:
                problems.append(f"{node_name}: its weight is not a 2-D float initializer")
            problems += [f"{node_name}: {problem}" for problem in stored.problems()]
        return problems

    def apply(self, model: onnx.ModelProto) -> PassResult:
        """One MatMulNBitsQuantizer run per setting, excluding every MatMul not assigned to it."""
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        by_format: dict[WeightFormat, set[str]] = defaultdict(set)
        for node_name, stored in self.assignment:
            by_format[stored].add(node_name)
        order = sorted(by_format, key=lambda f: (f.bits, f.block, f.symmetric, f.half_scales))
        for stored in order:
            chosen = by_format[stored]
            floats = _float_weights(model, chosen) if stored.half_scales else {}
            # Recomputed per run: earlier runs renamed their nodes to MatMulNBits.
            exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
            settings = stored.quantizer_settings()
            config = DefaultWeightOnlyQuantConfig(**settings, accuracy_level=self.accuracy_level)
            quantizer = MatMulNBitsQuantizer(
                model, **settings, accuracy_level=self.accuracy_level, nodes_to_exclude=exclude, algo_config=config
            )
            quantizer.process()
            converted = quantizer.model.model
            if converted is not model:
                model.CopyFrom(converted)
            for node_name, weight in floats.items():
                write_scales_in_fp16(model, stored, stored.node_name(node_name), weight)
        return PassResult(True, self.summary())

    def summary(self) -> str:
        """What the pass does, in one line: how many linears go to each width."""
        widths = Counter(stored.bits for _, stored in self.assignment)
        return f"quantized {len(self.assignment)} linear layer(s): " + ", ".join(
            f"{count} to int{bits}" for bits, count in sorted(widths.items())
        )

    def ensures(self, model: onnx.ModelProto) -> list[str]:
        """Exactly the assigned MatMuls are now MatMulNBits of the assigned width and block."""
        nodes = {node.name: node for node in model.graph.node}
        expected = {stored.node_name(name): stored for name, stored in self.assignment}
        initializers = {init.name: init for init in model.graph.initializer}
        producers = producers_of(model.graph)
        problems = []
        for name, stored in expected.items():
            node = nodes.get(name)
            if node is None or node.op_type != "MatMulNBits":
                problems.append(f"{name} was not created")
                continue
            attributes = {a.name: a.i for a in node.attribute}
            if {key: attributes.get(key) for key in stored.node_attributes()} != stored.node_attributes():
                problems.append(f"{name} has bits {attributes.get('bits')} block {attributes.get('block_size')}")
            source = initializers.get(stored_tensor(node.input[2], producers))
            if stored.half_scales and getattr(source, "data_type", None) != onnx.TensorProto.FLOAT16:
                problems.append(f"{name}: its scales are not stored in fp16")
        extra = [n for n, node in nodes.items() if node.op_type == "MatMulNBits" and n not in expected]
        problems += [f"{name} was quantized but not selected" for name in extra]
        assigned = {name for name, _ in self.assignment}
        problems += [f"{name} is still a MatMul" for name in assigned if name in nodes]
        return problems


def _float_weights(model: onnx.ModelProto, chosen: set[str]) -> dict[str, np.ndarray]:
    """The (K, N) float weights of the chosen MatMuls, before the quantizer replaces them."""
    initializers = {init.name: init for init in model.graph.initializer}
    return {
        node.name: numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        for node in model.graph.node
        if node.name in chosen
    }


def write_scales_in_fp16(model: onnx.ModelProto, stored: WeightFormat, node_name: str, weight: np.ndarray) -> None:
    """Rewrite the MatMulNBits `node_name` (onnxruntime's quantizer's, from the (K, N) float
    `weight`) in `stored`'s fp16-scale form: the weight rounded by `stored.quantize` (grids on
    fp16 scales), the scales stored in fp16 and, when the activations are of another type,
    read through a Cast to it (which onnxruntime folds when the session loads)."""
    import torch

    from surgery.analysis.quantization import replace_blocks

    node = next(n for n in model.graph.node if n.name == node_name)
    initializers = {init.name: init for init in model.graph.initializer}
    scales = initializers[node.input[2]]
    element_type = scales.data_type  # the quantizer writes scales in the activations' type
    replace_blocks(model, {node_name.rpartition("_Q")[0]: stored.quantize(torch.from_numpy(weight.T))})
    half = numpy_helper.to_array(scales).astype(np.float16)
    scales.CopyFrom(numpy_helper.from_array(half, scales.name))
    if element_type != onnx.TensorProto.FLOAT16:
        cast = f"{scales.name}/Cast"
        position = list(model.graph.node).index(node)
        model.graph.node.insert(position, helper.make_node("Cast", [scales.name], [cast], name=cast, to=element_type))
        node.input[2] = cast
