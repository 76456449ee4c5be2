"""MatMulNBits facts: unpacking a quantized weight, and counting bits exactly.

onnxruntime's `MatMulNBits` (com.microsoft) stores a (K, N) weight transposed and blockwise:
`B` is uint8 (N, K/block, block*bits/8) with the first element of a byte in its low bits,
`scales` is (N * K/block) floats, `zero_points` (absent when symmetric, meaning 2^(bits-1))
is packed like `B`. `dequantize` reverses that, so tests and the report can compare each
quantized weight with the float weight it replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

MS_DOMAIN = "com.microsoft"


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 bytes -> `count` unsigned `bits`-wide values per row, low bits first."""
    packed = packed.reshape(packed.shape[0], -1)
    if bits == 8:
        return packed[:, :count].astype(np.int32)
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)[:, :count].astype(np.int32)


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(int(a.i) for a in node.attribute if a.name == name)


def dequantize(node: onnx.NodeProto, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """The (K, N) float weight a MatMulNBits node computes with."""
    k, n = _attribute(node, "K"), _attribute(node, "N")
    bits, block = _attribute(node, "bits"), _attribute(node, "block_size")
    blocks = -(-k // block)
    q = _unpack(initializers[node.input[1]], bits, blocks * block).reshape(n, blocks, block)
    scales = initializers[node.input[2]].reshape(n, blocks, 1).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zero = _unpack(initializers[node.input[3]], bits, blocks).reshape(n, blocks, 1)
    else:
        zero = np.full((n, blocks, 1), 1 << (bits - 1), np.int32)
    weight = ((q - zero).astype(np.float32) * scales).reshape(n, blocks * block)[:, :k]
    return weight.T


@dataclass(frozen=True)
class QuantizedLinear:
    """One MatMulNBits node: its shape, width and storage."""

    node: str
    bits: int
    block: int
    parameters: int  # K * N
    storage_bytes: int  # B + scales + zero points

    @property
    def storage_bits(self) -> float:
        """Bits per weight including scales and zero points."""
        return 8 * self.storage_bytes / self.parameters


def quantized_linears(model: onnx.ModelProto) -> list[QuantizedLinear]:
    """Every MatMulNBits node of the model with its exact storage."""
    sizes = {init.name: _tensor_bytes(init) for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        storage = sum(sizes.get(name, 0) for name in node.input[1:4] if name)
        found.append(
            QuantizedLinear(
                node.name,
                _attribute(node, "bits"),
                _attribute(node, "block_size"),
                _attribute(node, "K") * _attribute(node, "N"),
                storage,
            )
        )
    return found


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def float_weights(model: onnx.ModelProto) -> int:
    """Float parameters stored in the model: every float initializer except derived tables.

    RoPE cos/sin caches and small shape constants are not parameters. A tied head written as
    its own quantized weight next to the float embedding counts as two stored weights.
    """
    consumed = set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            consumed.update(node.input[1:4])
        elif node.op_type == "GatherBlockQuantized":
            consumed.update(node.input[:1] + node.input[2:4])
    total = 0
    for init in model.graph.initializer:
        if init.name in consumed or init.name in ("cos_cache", "sin_cache") or init.name.startswith("/constants/"):
            continue
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            total += int(np.prod(init.dims)) if init.dims else 1
    return total


def quantized_embedding(model: onnx.ModelProto) -> dict[str, object] | None:
    """The block-quantized embedding lookup: width, block, storage, and whether it reads the head's tensors."""
    node = next((n for n in model.graph.node if n.op_type == "GatherBlockQuantized"), None)
    if node is None:
        return None
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {output: n for n in model.graph.node for output in n.output}
    shared = node.input[0] not in initializers  # a Reshape view of the quantized head's weight
    names = [producers[name].input[0] if name in producers else name for name in (node.input[:1] + node.input[2:4])]
    data = initializers[names[0]]
    bits = _attribute(node, "bits")
    rows = int(data.dims[0])
    hidden = int(np.prod(data.dims[1:])) * 8 // bits
    return {
        "bits": bits,
        "block": _attribute(node, "block_size"),
        "parameters": rows * hidden,
        "storage_bytes": sum(_tensor_bytes(initializers[name]) for name in names if name),
        "shared_with_head": shared,
    }


def bits_summary(model: onnx.ModelProto) -> dict[str, object]:
    """Average bits per weight of the quantized linears and of every stored weight of the model.

    `nominal` counts each quantized weight at its width (4 or 8) and every float weight at 32;
    `storage` counts what is stored: packed weights plus their scales and zero points. A
    quantized embedding counts once; when it reads the tied head's tensors it adds nothing.
    """
    linears = quantized_linears(model)
    embedding = quantized_embedding(model)
    quantized = sum(q.parameters for q in linears)
    if not quantized and embedding is None:
        return {"quantized_parameters": 0}
    nominal_bits = sum(q.bits * q.parameters for q in linears)
    storage_bits = sum(8 * q.storage_bytes for q in linears)
    rest = float_weights(model)
    model_quantized, model_nominal, model_storage = quantized, nominal_bits, storage_bits
    if embedding is not None and not embedding["shared_with_head"]:
        model_quantized += embedding["parameters"]
        model_nominal += embedding["bits"] * embedding["parameters"]
        model_storage += 8 * embedding["storage_bytes"]
    widths: dict[str, dict[str, int]] = {}
    for q in linears:
        entry = widths.setdefault(f"int{q.bits}", {"linears": 0, "parameters": 0})
        entry["linears"] += 1
        entry["parameters"] += q.parameters
    return {
        "quantized_parameters": quantized,
        "float_parameters": rest,
        "widths": widths,
        "quantized_linears_nominal_bits": nominal_bits / quantized if quantized else None,
        "quantized_linears_storage_bits": storage_bits / quantized if quantized else None,
        "embedding": embedding,
        "model_nominal_bits": (model_nominal + 32 * rest) / (model_quantized + rest),
        "model_storage_bits": (model_storage + 32 * rest) / (model_quantized + rest),
    }


def initializer_arrays(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """The named initializers as numpy arrays (weights must be loaded)."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer if init.name in names}
