"""Reading an output folder back (`surgery run`, `surgery eval`, `eval --against`), checked first.

onnxruntime and transformers fail on a damaged folder with errors that name neither the file
nor the tensor (or crash outright on a truncated data file), so `open_model_folder` checks what
they will read: `model.onnx` parses, every tensor stored outside it lies inside its data file
(which must be a file of the folder itself), and the tokenizer loads. Each problem is a
`ModelFolderError` naming the file and the tensor. An output that failed its checks when it was
written is refused until it is accepted (`surgery accept`), or for one command with
`--allow-failed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.diagnostics import HintedError

_HINT = "give a folder written by `surgery apply` (write it again if it was damaged)"


class ModelFolderError(HintedError):
    """An output folder that cannot be run."""


@dataclass(frozen=True)
class ModelFolder:
    """A checked output folder: its tokenizer and the longest sequence its model takes (if known)."""

    path: str
    tokenizer: Any
    context_length: int | None
    report: dict | None = None  # its surgery.json, read once


def _check_external_data(folder: Path, model: Any) -> None:
    from onnx import TensorProto

    sizes: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        # A data file is a file of the folder: never an absolute path or one that leaves it.
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise ModelFolderError(f"model.onnx: tensor '{tensor.name}' names an unsafe data file '{location}'", _HINT)
        if location not in sizes:
            path = folder / location
            if not path.is_file():
                raise ModelFolderError(f"'{location}' is missing (model.onnx stores '{tensor.name}' in it)", _HINT)
            sizes[location] = path.stat().st_size
        try:
            offset, length = int(entries.get("offset", 0)), int(entries["length"])
        except (KeyError, ValueError):
            problem = f"model.onnx: tensor '{tensor.name}' has no valid data offset/length"
            raise ModelFolderError(problem, _HINT) from None
        if offset < 0 or length < 0 or offset + length > sizes[location]:
            raise ModelFolderError(
                f"'{location}' is truncated: tensor '{tensor.name}' needs bytes {offset}..{offset + length}, "
                f"the file has {sizes[location]}",
                _HINT,
            )


def _context_length(report: dict | None) -> int | None:
    try:
        value = report["export"]["context_length"]
    except (KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def open_model_folder(path: str, tokenizer: bool = True, allow_failed: bool = False) -> ModelFolder:
    """Check an output folder (see the module docstring); with `tokenizer`, load its tokenizer.
    An output that failed its checks and was not accepted is refused unless `allow_failed`
    (surgery.backend.verdict)."""
    import onnx

    from surgery.backend.verdict import read_report, unaccepted_failure

    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"'{path}' is not a folder" if folder.exists() else f"'{path}' not found", _HINT)
    report = read_report(folder)
    failed = unaccepted_failure(report)
    if failed and not allow_failed:
        raise ModelFolderError(
            f"'{path}' failed its checks when it was written: {'; '.join(failed)}",
            f"inspect it with --allow-failed, or accept it with `surgery accept {path}` (which also lets "
            "onnxruntime-genai load it)",
        )
    if not (folder / "model.onnx").is_file():
        raise ModelFolderError(f"'{path}' has no model.onnx", _HINT)
    try:
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise ModelFolderError(f"'{path}/model.onnx' is damaged (not an ONNX model)", _HINT) from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        # An empty file parses as an empty model: onnxruntime would refuse it with an internal error.
        raise ModelFolderError(f"'{path}/model.onnx' is damaged (it holds no graph)", _HINT)
    _check_external_data(folder, model)
    loaded = None
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            loaded = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as error:  # transformers raises many kinds for missing or damaged files
            raise ModelFolderError(
                f"cannot load the tokenizer in '{path}' ({type(error).__name__})",
                "the folder needs its tokenizer files (tokenizer.json, tokenizer_config.json) as apply wrote them",
            ) from None
    return ModelFolder(str(folder), loaded, _context_length(report), report)
