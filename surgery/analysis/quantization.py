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

from surgery.formats.names import LINEAR_ORDER, linear_kind, linear_of_packed_weight

MS_DOMAIN = "com.microsoft"


def _unpack_torch(packed, bits: int):
    """uint8 bytes -> `bits`-wide values, low bits first (4 bits: two per byte; 8 bits: as they are)."""
    import torch

    if bits == 8:
        return packed
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(int(a.i) for a in node.attribute if a.name == name)


def producers_of(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Each node output's producing node."""
    return {output: node for node in graph.node for output in node.output}


def stored_tensor(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The initializer a quantized operator's input `name` reads: itself, or the one behind the
    Casts (fp16 scales in another element type) and Reshapes (a tied head's tensors viewed by
    the embedding's lookup) that the exporter puts between them."""
    while name in producers and producers[name].op_type in ("Cast", "Reshape"):
        name = producers[name].input[0]
    return name


def read_through_cast(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether input `name` reaches its initializer through a Cast: scales stored in fp16 in an
    export of another element type (`WeightFormat.half_scales`)."""
    while name in producers and producers[name].op_type in ("Cast", "Reshape"):
        if producers[name].op_type == "Cast":
            return True
        name = producers[name].input[0]
    return False


def dequantize(node: onnx.NodeProto, initializers: dict[str, np.ndarray],
               producers: dict[str, onnx.NodeProto] | None = None) -> np.ndarray:  # fmt: skip
    """The (K, N) float weight a MatMulNBits node computes with (`producers`: the graph's, when
    an input is read through a Cast)."""
    names = [stored_tensor(name, producers or {}) if name else name for name in node.input]
    zero_points = initializers[names[3]] if len(names) > 3 and names[3] else None
    blocks = BlockQuantized(initializers[names[1]], initializers[names[2]], zero_points)
    return blocks.dequantize(_attribute(node, "K"), _attribute(node, "bits"), _attribute(node, "block_size"))


@dataclass(frozen=True)
class BlockQuantized:
    """One weight in MatMulNBits' layout: packed values (N, K/block, block*bits/8), scales
    (N, K/block) and zero points (None when symmetric)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    def as_rows(self) -> BlockQuantized:
        """The same blocks in GatherBlockQuantized's layout for a table (row r quantized as column
        r of a MatMulNBits weight): packed weights and zero points flattened per row."""
        rows = self.packed.shape[0]
        zero_points = None if self.zero_points is None else self.zero_points.reshape(rows, -1)
        return BlockQuantized(self.packed.reshape(rows, -1), self.scales, zero_points)

    def dequantize(self, k: int, bits: int, block: int) -> np.ndarray:
        """The (K, N) float32 weight these blocks stand for."""
        return self.dequantize_rows(k, bits, block, 0, self.packed.shape[0]).numpy().T

    def dequantize_rows(self, k: int, bits: int, block: int, start: int, stop: int, device=None):
        """Rows start..stop of the (N, K) weight (PyTorch's layout) as a float32 torch tensor on
        `device` (default the CPU; the packed bytes travel, not the floats); a chunk at a time
        keeps the temporaries of a weight of billions small."""
        import torch

        packed = torch.from_numpy(np.array(self.packed[start:stop])).to(device)
        n, blocks = packed.shape[0], packed.shape[1]
        q = _unpack_torch(packed, bits).reshape(n, blocks, -1)[:, :, :block]
        if self.zero_points is not None:
            zero = _unpack_torch(torch.from_numpy(np.array(self.zero_points[start:stop])).to(device), bits)
            zero = zero.reshape(n, -1)[:, :blocks, None]
        else:
            zero = torch.full((1, 1, 1), 1 << (bits - 1), dtype=torch.int16, device=device)
        scales = torch.from_numpy(np.array(self.scales[start:stop])).to(device).reshape(n, blocks, 1).float()
        return ((q.to(torch.int16) - zero.to(torch.int16)).float() * scales).reshape(n, -1)[:, :k]


_CHUNK_BYTES = 32 << 20  # output rows quantized per call: one fp32 transpose of about this size


def quantize_blocks_nk(weight, bits: int, block: int, symmetric: bool) -> BlockQuantized:
    """`quantize_blocks` of `weight.T` for an (N, K) torch weight as PyTorch stores it (out, in).

    Blocks run along K within one output column, so columns quantize independently: they are
    taken a chunk of rows at a time, and only a chunk is ever transposed (a 2 GB head does not
    need a second 2 GB copy). A chunk is transposed by tiles on several threads
    (`parallel_transpose_rows_into`: torch's own copy of a transposed view walks one side with
    a large stride, and took more time than the quantization itself on a 16-core machine).
    The bytes are those of a plain transpose."""
    import torch

    from surgery.export.writer import parallel_transpose_rows_into

    n, k = weight.shape
    rows = max(1, _CHUNK_BYTES // (4 * k))
    source = weight.detach()
    parts = []
    for start in range(0, n, rows):
        chunk = source[start : start + rows].to(torch.float32).contiguous()
        transposed = torch.empty((k, chunk.shape[0]), dtype=torch.float32)
        parallel_transpose_rows_into(chunk, 0, transposed)
        parts.append(quantize_blocks(transposed.numpy(), bits, block, symmetric))
    if len(parts) == 1:
        return parts[0]
    zero_points = None if symmetric else np.concatenate([p.zero_points for p in parts])
    return BlockQuantized(
        np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]), zero_points
    )


def quantize_blocks(weight: np.ndarray, bits: int, block: int, symmetric: bool) -> BlockQuantized:
    """A (K, N) float weight quantized blockwise along K, exactly as onnxruntime's
    MatMulNBitsQuantizer does it (its own C++ kernels, called on this one tensor), so a weight
    quantized while it is written equals one quantized by the ONNX pass afterwards."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    per_byte = 8 // bits
    k_blocks = -(-rows // block)
    if k_blocks * block != rows:
        weight = np.pad(weight, ((0, k_blocks * block - rows), (0, 0)))
    packed = np.zeros((cols, k_blocks, -(-block // per_byte)), np.uint8)
    zero_points = np.zeros((cols, -(-k_blocks // per_byte)), np.uint8)
    scales = np.zeros((cols, k_blocks), np.float32)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, weight, scales, zero_points, block, cols, rows, symmetric)
    return BlockQuantized(packed, scales, None if symmetric else zero_points)


@dataclass(frozen=True)
class QuantizedLinear:
    """One MatMulNBits node: its shape, width and storage."""

    node: str
    bits: int
    block: int
    parameters: int  # K * N
    storage_bytes: int  # B + scales + zero points
    linear: str = ""  # the exported linear it stands for (`model.layers.3.mlp.down_proj`, `lm_head`)

    @property
    def storage_bits(self) -> float:
        """Bits per weight including scales and zero points."""
        return 8 * self.storage_bytes / self.parameters


def quantized_linears(model: onnx.ModelProto) -> list[QuantizedLinear]:
    """Every MatMulNBits node of the model with its exact storage."""
    sizes = {init.name: _tensor_bytes(init) for init in model.graph.initializer}
    producers = producers_of(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        storage = sum(sizes.get(stored_tensor(name, producers), 0) for name in node.input[1:4] if name)
        found.append(
            QuantizedLinear(
                node.name,
                _attribute(node, "bits"),
                _attribute(node, "block_size"),
                _attribute(node, "K") * _attribute(node, "N"),
                storage,
                linear_of_packed_weight(node.input[1]),
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
    producers = producers_of(model.graph)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            consumed.update(stored_tensor(name, producers) for name in node.input[1:4])
        elif node.op_type == "GatherBlockQuantized":
            consumed.update(stored_tensor(name, producers) for name in node.input[:1] + node.input[2:4])
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
    producers = producers_of(model.graph)
    shared = node.input[0] not in initializers  # a Reshape view of the quantized head's weight
    names = [stored_tensor(name, producers) if name else name for name in (node.input[:1] + node.input[2:4])]
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
        "by_kind": _by_kind(linears),
        "quantized_linears_nominal_bits": nominal_bits / quantized if quantized else None,
        "quantized_linears_storage_bits": storage_bits / quantized if quantized else None,
        "embedding": embedding,
        "model_nominal_bits": (model_nominal + 32 * rest) / (model_quantized + rest),
        "model_storage_bits": (model_storage + 32 * rest) / (model_quantized + rest),
    }


def _by_kind(linears: list[QuantizedLinear]) -> dict[str, dict[str, object]]:
    """Per kind of linear (qkv_proj, o_proj, gate_proj, up_proj, down_proj, lm_head): how many,
    their parameters and bytes, the count at each width, and the bits per weight stored (scales
    and zero points included): where a mixed-precision recipe spent its bits."""
    kinds: dict[str, dict[str, object]] = {}
    for q in linears:
        entry = kinds.setdefault(linear_kind(q.linear), {"linears": 0, "parameters": 0, "bytes": 0, "widths": {}})
        entry["linears"] += 1
        entry["parameters"] += q.parameters
        entry["bytes"] += q.storage_bytes
        entry["widths"][f"int{q.bits}"] = entry["widths"].get(f"int{q.bits}", 0) + 1
    for entry in kinds.values():
        entry["storage_bits"] = 8 * entry["bytes"] / entry["parameters"]
    order = {kind: i for i, kind in enumerate(LINEAR_ORDER)}
    return dict(sorted(kinds.items(), key=lambda item: order.get(item[0], len(order))))


def replace_blocks(model: onnx.ModelProto, blocks: dict[str, BlockQuantized]) -> None:
    """Write `blocks` over the weights of the MatMulNBits that replaced each named MatMul
    (`<node>_Q<bits>`): the same tensors, the same shapes, other values (GPTQ's rounding over
    the quantize pass's round-to-nearest)."""
    if not blocks:
        return
    nodes = {node.name: node for node in model.graph.node if node.op_type == "MatMulNBits"}
    initializers = {init.name: init for init in model.graph.initializer}
    producers = producers_of(model.graph)
    for matmul, quantized in blocks.items():
        # `<matmul>_Q<bits>`, whatever the width (WeightFormat.node_name)
        node = next(node for name, node in nodes.items() if name.rpartition("_Q")[0] == matmul)
        arrays = [quantized.packed, quantized.scales, quantized.zero_points]
        for name, array in zip(node.input[1:4], arrays, strict=False):
            if not name or array is None:
                continue
            name = stored_tensor(name, producers)
            old = initializers[name]
            array = np.asarray(array, dtype=onnx.helper.tensor_dtype_to_np_dtype(old.data_type))
            if array.size != int(np.prod(old.dims)):
                raise ValueError(f"{name}: {array.size} values calibrated against {list(old.dims)} written")
            old.CopyFrom(numpy_helper.from_array(array.reshape(tuple(old.dims)), name))


def initializer_arrays(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """The named initializers as numpy arrays (weights must be loaded)."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer if init.name in names}
