"""Export options (what `export onnx ...` asks for); importable without torch or onnx."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OPSET = 21
SUPPORTED_OPSETS = range(17, 24)


@dataclass(frozen=True)
class ExportOptions:
    """What `export onnx ...` asked for."""

    opset: int = DEFAULT_OPSET
    kv_cache: bool = True
