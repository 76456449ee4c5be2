"""How a quantized weight is stored, as one record: width, block, symmetry, and what follows.

`quantize ... to int4|int8 [block N] [symmetric]` resolves to a `WeightFormat`. The record says
which widths and blocks exist, how it is described, what it costs in bytes, how a float weight
is rounded into it (to nearest, or by GPTQ against a Hessian), how it is read back to floats
for verification, and how a linear or the embedding stored in it is emitted (onnxruntime's
MatMulNBits and GatherBlockQuantized: packed unsigned integers in blocks along K, a scale per
block, and a zero point per block unless symmetric). The plan's `quantization()` maps each
quantized target to one; the exporter, the ONNX quantize passes, GPTQ and verification ask it.
Importable without torch or onnx: `check` reads it (the heavy work is imported where it runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WIDTHS = (4, 8)
BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class WeightFormat:
    """Blockwise integer weights: `bits` wide, `block` weights to a scale, symmetric or with zero points."""

    bits: int
    block: int = DEFAULT_BLOCK
    symmetric: bool = False

    linear_operator = "MatMulNBits"
    embedding_operator = "GatherBlockQuantized"

    @property
    def name(self) -> str:
        """`int4`, `int8`: the width as the recipe spells it."""
        return f"int{self.bits}"

    def describe(self, operator: str | None = None, note: str = "") -> str:
        """`int4 (MatMulNBits, block 32, asymmetric)`, with `note` inside the parentheses."""
        kind = "symmetric" if self.symmetric else "asymmetric"
        details = [operator or self.linear_operator, f"block {self.block}", kind, *([note] if note else [])]
        return f"{self.name} ({', '.join(details)})"

    def storage_bytes(self, rows: int, columns: int, scale_bytes: int = 4) -> int:
        """Bytes of a (rows x columns) weight stored this way, blocks along the columns: packed
        weights, one scale per block and, unless symmetric, packed zero points per block."""
        blocks = -(-columns // self.block)
        packed = rows * blocks * self.block * self.bits // 8
        zero_points = 0 if self.symmetric else rows * -(-blocks * self.bits // 8)
        return packed + rows * blocks * scale_bytes + zero_points

    @classmethod
    def of_node(cls, attributes: dict[str, Any], has_zero_points: bool) -> WeightFormat:
        """The format a written MatMulNBits or GatherBlockQuantized node stores (its attributes,
        and whether it reads zero points)."""
        return cls(int(attributes["bits"]), int(attributes["block_size"]), symmetric=not has_zero_points)

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
        """Round an (N, K) torch weight to nearest into blocks (surgery.analysis.quantization.BlockQuantized)."""
        from surgery.analysis.quantization import quantize_blocks_nk

        return quantize_blocks_nk(weight, self.bits, self.block, self.symmetric)

    def quantize_gptq(self, weight, hessian) -> Any:
        """Round an (N, K) torch weight into blocks by GPTQ against `hessian` (K x K, X^T X)."""
        from surgery.analysis.gptq import gptq_blocks

        return gptq_blocks(weight, hessian, self.bits, self.block, self.symmetric)

    def quantize_table(self, table) -> tuple[Any, Any, Any]:
        """An embedding table (rows, hidden) in GatherBlockQuantized's layout: (packed [rows,
        blocks * block * bits / 8] uint8, scales [rows, blocks], zero points or None). Row r is
        quantized as column r of a MatMulNBits weight, by onnxruntime's packer."""
        from surgery.analysis.quantization import quantize_table

        return quantize_table(table, self.bits, self.block, self.symmetric)

    def dequantize_rows(self, blocks, k: int, start: int, stop: int) -> Any:
        """Rows start..stop of the (N, K) float32 weight `blocks` stand for, as a torch tensor:
        what verification computes with to check the written bytes."""
        return blocks.dequantize_rows(k, self.bits, self.block, start, stop)

    def emit_linear(self, writer, x: str, weight_name: str, blocks, node: str, outputs: list[str], n: int, k: int,
                    accuracy_level: int = 0) -> str:  # fmt: skip
        """The MatMulNBits node of `x @ W.T` for blocks of an (N, K) weight, its initializers
        named as onnxruntime's quantizer names them (`<node>_Q<bits>`, `<weight>_Q<bits>`,
        `_scales`, `_zero_points`)."""
        inputs = [
            x,
            writer.weight(f"{weight_name}_Q{self.bits}", blocks.packed, parameter=False),
            writer.weight(f"{weight_name}_scales", blocks.scales, parameter=False),
        ]
        if blocks.zero_points is not None:
            inputs.append(writer.weight(f"{weight_name}_zero_points", blocks.zero_points, parameter=False))
        level = {"accuracy_level": accuracy_level} if accuracy_level else {}
        return writer.node(
            self.linear_operator, inputs, f"{node}_Q{self.bits}", outputs, "com.microsoft",
            K=k, N=n, bits=self.bits, block_size=self.block, **level,
        )[0]  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """Plain data for the plan and the report."""
        return {"bits": self.bits, "block": self.block, "symmetric": self.symmetric}


@dataclass(frozen=True)
class QuantizedTarget:
    """What the plan quantizes one target to: its format, and whether GPTQ rounds it."""

    format: WeightFormat
    gptq: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain data for the plan and the report."""
        return {**self.format.to_json(), "gptq": self.gptq}
