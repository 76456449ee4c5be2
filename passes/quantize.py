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
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import ClassVar

import onnx

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
        order = sorted(by_format, key=lambda f: (f.bits, f.block, f.symmetric))
        for stored in order:
            chosen = by_format[stored]
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
        problems = []
        for name, stored in expected.items():
            node = nodes.get(name)
            if node is None or node.op_type != "MatMulNBits":
                problems.append(f"{name} was not created")
                continue
            attributes = {a.name: a.i for a in node.attribute}
            if {key: attributes.get(key) for key in stored.node_attributes()} != stored.node_attributes():
                problems.append(f"{name} has bits {attributes.get('bits')} block {attributes.get('block_size')}")
        extra = [n for n, node in nodes.items() if node.op_type == "MatMulNBits" and n not in expected]
        problems += [f"{name} was quantized but not selected" for name in extra]
        assigned = {name for name, _ in self.assignment}
        problems += [f"{name} is still a MatMul" for name in assigned if name in nodes]
        return problems
