"""How a quantized weight is stored, as one record: width, block, symmetry, and what follows.

`quantize ... to int4|int8 [block N] [symmetric]` resolves to a `WeightFormat`. The record says
which widths and blocks exist, how it is described, what it costs in bytes, how a float weight
is rounded into it (to nearest, or by GPTQ against a Hessian), how it is read back to floats
for verification, and how a linear or the embedding stored in it is emitted (onnxruntime's
MatMulNBits and GatherBlockQuantized: packed unsigned integers in blocks along K, a scale per
block, and a zero point per block unless symmetric).

Scales are stored in the export's element type, or with `half_scales` in fp16 whatever it is
(llama.cpp's K-quants keep theirs in fp16): at block 32 that is 4.625 bits per int4 weight
instead of 5.125 in an fp32 export. onnxruntime's operators take scales in the activations'
type, so an fp32 export reads them through a `Cast` of the fp16 initializer; onnxruntime folds
that Cast when the session loads and prepacks the result as before (same speed, measured on a
1,536 x 8,960 int4 linear), so only the file is smaller. The grid is rounded to fp16 before
the codes are chosen, so the codes sit on the scale that is stored. The plan's `quantization()` maps each
quantized target to one; the exporter, the ONNX quantize passes, GPTQ and verification ask it.
Importable without torch or onnx: `check` reads it (the heavy work is imported where it runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto's element types (this module imports no onnx)
EMBEDDING_GATHER = "/model/embed_tokens/Gather"  # the embedding lookup's node, and its quantized form's prefix
WIDTHS = (4, 8)
BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
DEFAULT_BLOCK = 32


def lookup_shapes(rows: int, blocks: int) -> list[list[int]]:
    """The shapes GatherBlockQuantized reads a tied head's MatMulNBits tensors in: packed rows
    [rows, blocks * blob], scales [rows, blocks], zero points [rows, packed blocks]."""
    return [[rows, -1], [rows, blocks], [rows, -1]]


@dataclass(frozen=True)
class WeightFormat:
    """Blockwise integer weights: `bits` wide, `block` weights to a scale, symmetric or with zero points."""

    bits: int
    block: int = DEFAULT_BLOCK
    symmetric: bool = False
    half_scales: bool = False  # scales stored in fp16, whatever the export's element type

    linear_operator = "MatMulNBits"
    embedding_operator = "GatherBlockQuantized"

    @property
    def name(self) -> str:
        """`int4`, `int8`: the width as the recipe spells it."""
        return f"int{self.bits}"

    def describe(self, operator: str | None = None, note: str = "") -> str:
        """`int4 (MatMulNBits, block 32, asymmetric)`, with `note` inside the parentheses."""
        kind = "symmetric" if self.symmetric else "asymmetric"
        details = [operator or self.linear_operator, f"block {self.block}", kind,
                   *(["fp16 scales"] if self.half_scales else []), *([note] if note else [])]  # fmt: skip
        return f"{self.name} ({', '.join(details)})"

    def scale_bytes(self, element_bytes: int) -> int:
        """Bytes of one scale in an export whose element type has `element_bytes`."""
        return 2 if self.half_scales else element_bytes

    def scale_dtype(self, element: np.dtype | type) -> np.dtype | type:
        """The numpy type its scales are stored in, in an export of element type `element`."""
        return np.float16 if self.half_scales else element

    def storage_bytes(self, rows: int, columns: int, element_bytes: int = 4) -> int:
        """Bytes of a (rows x columns) weight stored this way in an export whose element type has
        `element_bytes`, blocks along the columns: packed weights, one scale per block and,
        unless symmetric, packed zero points per block."""
        blocks = -(-columns // self.block)
        packed = rows * blocks * self.block * self.bits // 8
        zero_points = 0 if self.symmetric else rows * -(-blocks * self.bits // 8)
        return packed + rows * blocks * self.scale_bytes(element_bytes) + zero_points

    @classmethod
    def of_node(cls, attributes: dict[str, Any], has_zero_points: bool, half_scales: bool = False) -> WeightFormat:
        """The format a written MatMulNBits or GatherBlockQuantized node stores (its attributes,
        whether it reads zero points, and whether its scales are stored in fp16 apart from the
        activations' type)."""
        return cls(int(attributes["bits"]), int(attributes["block_size"]), symmetric=not has_zero_points,
                   half_scales=half_scales)  # fmt: skip

    def problems(self) -> list[str]:
        """Why onnxruntime's operators cannot hold this format (empty when they can)."""
        if self.bits not in WIDTHS or self.block < 16 or self.block & (self.block - 1):
            return [f"unsupported int{self.bits} block {self.block}"]
        return []

    def node_name(self, matmul: str) -> str:
        """The name of the MatMulNBits node that replaces the MatMul `matmul` (onnxruntime's
        quantizer's naming, which the exporter follows)."""
        return f"{matmul}_Q{self.bits}"

    def quantizer_settings(self) -> dict[str, Any]:
        """The keyword arguments onnxruntime's MatMulNBitsQuantizer takes for this format."""
        return {"bits": self.bits, "block_size": self.block, "is_symmetric": self.symmetric}

    def node_attributes(self) -> dict[str, int]:
        """The width and block attributes its operators carry."""
        return {"bits": self.bits, "block_size": self.block}

    def quantize(self, weight) -> Any:
        """Round an (N, K) torch weight to nearest into blocks (surgery.analysis.quantization.BlockQuantized):
        by onnxruntime's packer, or with fp16 scales on its grid rounded to fp16 (in torch)."""
        if self.half_scales:
            from surgery.analysis.rounding import quantize_range

            return quantize_range(weight, self.bits, self.block, self.symmetric, half=True)
        from surgery.analysis.quantization import quantize_blocks_nk

        return quantize_blocks_nk(weight, self.bits, self.block, self.symmetric)

    def quantize_gptq(self, weight, hessian, searched: bool = False, act_order: bool = False) -> Any:
        """Round an (N, K) torch weight into blocks by GPTQ against `hessian` (K x K, X^T X), on
        the Hessian's device; `searched` grids and `act_order` as `surgery.analysis.gptq` says."""
        from surgery.analysis.gptq import gptq_blocks

        return gptq_blocks(weight, hessian, self.bits, self.block, self.symmetric, searched=searched,
                           act_order=act_order, half=self.half_scales)  # fmt: skip

    def quantize_table(self, table) -> tuple[Any, Any, Any]:
        """An embedding table (rows, hidden) in GatherBlockQuantized's layout: (packed [rows,
        blocks * block * bits / 8] uint8, scales [rows, blocks], zero points or None), rounded as
        `quantize` rounds row r as column r of a MatMulNBits weight."""
        import torch

        blocks = self.quantize(torch.from_numpy(np.asarray(table, np.float32))).as_rows()
        return blocks.packed, blocks.scales, blocks.zero_points

    def dequantize_rows(self, blocks, k: int, start: int, stop: int, device=None) -> Any:
        """Rows start..stop of the (N, K) float32 weight `blocks` stand for, as a torch tensor
        (on `device`, default the CPU): what verification computes with to check the written
        bytes, and what GPTQ's next layer is calibrated on."""
        return blocks.dequantize_rows(k, self.bits, self.block, start, stop, device)

    def write_blocks(self, writer, weight_name: str, blocks, element_type: int = FLOAT) -> list[str]:
        """The initializers of blocks of a weight, named as onnxruntime's quantizer names them
        (`<weight>_Q<bits>`, `_scales`, `_zero_points`): MatMulNBits' inputs after the first.
        Scales stored in fp16 in an export of another element type (`element_type`, ONNX's enum)
        are read through a `Cast` to it (`<weight>_scales/Cast`), which onnxruntime folds."""
        scales = writer.weight(f"{weight_name}_scales", blocks.scales, parameter=False)
        if self.half_scales and element_type != FLOAT16:
            scales = writer.op("Cast", [scales], f"{weight_name}_scales/Cast", to=element_type)
        tensors = [writer.weight(f"{weight_name}_Q{self.bits}", blocks.packed, parameter=False), scales]
        if blocks.zero_points is not None:
            tensors.append(writer.weight(f"{weight_name}_zero_points", blocks.zero_points, parameter=False))
        return tensors

    def emit_linear(self, writer, x: str, weight_name: str, blocks, node: str, outputs: list[str], n: int, k: int,
                    accuracy_level: int = 0, tensors: list[str] | None = None,
                    element_type: int = FLOAT) -> str:  # fmt: skip
        """The MatMulNBits node of `x @ W.T` for blocks of an (N, K) weight (`write_blocks`), named
        `<node>_Q<bits>` as onnxruntime's quantizer names it; `tensors`: blocks written already
        (a tied head the embedding's lookup read first)."""
        inputs = [x, *(tensors or self.write_blocks(writer, weight_name, blocks, element_type))]
        level = {"accuracy_level": accuracy_level} if accuracy_level else {}
        return writer.node(
            self.linear_operator, inputs, f"{node}_Q{self.bits}", outputs, "com.microsoft",
            K=k, N=n, bits=self.bits, block_size=self.block, **level,
        )[0]  # fmt: skip

    def emit_lookup(self, writer, tensors: list[str], ids: str, rows: int, hidden: int, views: bool) -> str:
        """The GatherBlockQuantized lookup of `ids` in a table stored as `tensors` (its packed rows,
        scales[, zero points]); `views`: the tensors are a tied head's MatMulNBits blocks, read
        through Reshapes into the lookup's shapes (as surgery.passes.quantize_embedding writes it)."""
        if views:
            viewed = []
            shapes = lookup_shapes(rows, hidden // self.block)
            for position, (tensor, shape) in enumerate(zip(tensors, shapes, strict=False)):
                shape_name = writer.weight(f"{EMBEDDING_GATHER}/shape_{position}", np.array(shape, np.int64),
                                           parameter=False)  # fmt: skip
                view = f"{EMBEDDING_GATHER}/view_{position}"
                viewed.append(writer.node("Reshape", [tensor, shape_name], view, [view])[0])
            tensors = viewed
        data, *rest = tensors
        return writer.op(self.embedding_operator, [data, ids, *rest], f"{EMBEDDING_GATHER}BlockQuantized",
                         "com.microsoft", **self.node_attributes(), gather_axis=0, quantize_axis=1)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """Plain data for the plan and the report."""
        return {"bits": self.bits, "block": self.block, "symmetric": self.symmetric, "half_scales": self.half_scales}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeightFormat:
        """The format `to_json` (or a quantize step's parameters) describes."""
        return cls(data["bits"], data["block"], data["symmetric"], bool(data.get("half_scales", False)))


@dataclass(frozen=True)
class QuantizedTarget:
    """What the plan quantizes one target to: its format, and how it is rounded: to nearest on
    onnxruntime's range grid; `weighted`, on the grid with the least activation-weighted error;
    `gptq`, by GPTQ (on weighted grids when both; `act_order`, largest inputs first).

    `bits_per_weight` marks a target of `quantize model to <bits> bits per weight`: its format is
    chosen at run time by measured sensitivity (`surgery.analysis.mixed_precision`); until then
    `format` is the smallest the preset allows."""

    format: WeightFormat
    gptq: bool = False
    weighted: bool = False
    act_order: bool = False
    bits_per_weight: float | None = None

    @property
    def uses_data(self) -> bool:
        """Whether its rounding (or its format's choice) reads the calibration data."""
        return self.gptq or self.weighted or self.bits_per_weight is not None

    def rounding(self) -> str:
        """How it is rounded, in words."""
        if self.gptq:
            how = "GPTQ on the calibration data"
            return how + (", weighted grids" if self.weighted else "") + (", act-order" if self.act_order else "")
        if self.weighted:
            return "grids weighted by the calibration activations"
        return "to nearest"

    def to_json(self) -> dict[str, Any]:
        """Plain data for the plan and the report."""
        extra = {"bits_per_weight": self.bits_per_weight} if self.bits_per_weight is not None else {}
        return {**self.format.to_json(), "gptq": self.gptq, "weighted": self.weighted, "act_order": self.act_order,
                **extra}  # fmt: skip
