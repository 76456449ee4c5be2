"""Checking a model folder's weights before and after loading: the files, then against the config.

Two layers of checks, each problem a message that names the file and the tensor:

1. `weight_files` reads only the headers of the safetensors files transformers would
   load (the index's shards, or `model.safetensors`) and checks that each header is well formed
   and that every tensor's bytes lie inside its file, in the size its dtype and shape need. A
   truncated download or a file whose header lies is caught here, before anything is loaded.
2. `loading_problems` turns transformers' loading report into diagnostics: tensors the config
   expects that the weights lack (transformers would fill them with random numbers), tensors
   the weights have that the config does not expect (transformers would drop them), and
   tensors whose shape differs from the config's. A config whose `num_hidden_layers` disagrees
   with the weights is named as such.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

from surgery.diagnostics import HintedError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HEADER_LIMIT = 100 * (1 << 20)  # the safetensors library's own limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class WeightsError(HintedError):
    """The weights cannot be used; `problems` holds one (message, hint) per finding."""

    def __init__(self, problems: list[tuple[str, str | None]]):
        self.problems = problems
        super().__init__("; ".join(message for message, _ in problems), problems[0][1] if problems else None)


def _header(path: Path) -> dict[str, dict]:
    """The tensor entries of one safetensors file, checked against the file's size."""
    return safetensors_header(path)[1]


def safetensors_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(where the file's tensor data starts, its checked tensor entries: dtype, shape, offsets)."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise WeightsError([(f"weights file '{name}' is truncated: it has no safetensors header", None)])
            (length,) = struct.unpack("<Q", prefix)
            if length > _HEADER_LIMIT or 8 + length > size:
                raise WeightsError(
                    [(f"weights file '{name}' is truncated or not safetensors: its header runs past the end", None)]
                )
            raw = handle.read(length)
    except OSError as error:
        reason = (error.strerror or "I/O error").lower()
        raise WeightsError([(f"weights file '{name}' cannot be read: {reason}", None)]) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WeightsError([(f"weights file '{name}' has a damaged header (not JSON)", None)]) from None
    if not isinstance(header, dict):
        raise WeightsError([(f"weights file '{name}' has a damaged header (not a JSON object)", None)])
    data_size = size - 8 - length
    tensors = {}
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        problem = _entry_problem(entry, data_size)
        if problem:
            raise WeightsError([(f"weights file '{name}', tensor '{tensor}': {problem}", None)])
        tensors[tensor] = entry
    return 8 + length, tensors


def _entry_problem(entry: object, data_size: int) -> str | None:
    """What is wrong with one header entry, or None."""
    if not isinstance(entry, dict):
        return "its header entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        return f"unknown dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return "its shape is not a list of sizes"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return "its data offsets are not two increasing byte positions"
    needed = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != needed:
        return f"the header says {offsets[1] - offsets[0]} bytes, but {dtype} {tuple(shape)} needs {needed}"
    if offsets[1] > data_size:
        return f"its data runs past the end of the file (the file is truncated: {data_size} data bytes)"
    return None


def weight_files(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The safetensors files transformers loads from `folder`, each with the tensors it holds."""
    folder = Path(folder)
    index_path = folder / INDEX
    if not index_path.exists():
        single = folder / SINGLE
        if not single.exists():
            return {}
        return {SINGLE: list(_header(single))}
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise WeightsError([(f"'{INDEX}' is damaged (no weight_map of tensor names to files)", None)]) from None
    files: dict[str, list[str]] = {}
    for tensor, file in weight_map.items():
        files.setdefault(file, []).append(tensor)
    for file, tensors in files.items():
        # The index names files in the folder; a path that leaves it is not a shard.
        if os.path.basename(file) != file or file in ("", ".", ".."):
            raise WeightsError([(f"'{INDEX}' names '{file[:80]}', which is not a file of the model folder", None)])
        if not (folder / file).is_file():
            raise WeightsError([(f"weights file '{file}' (listed in {INDEX}) is missing", None)])
        held = _header(folder / file)
        absent = [t for t in tensors if t not in held]
        if absent:
            raise WeightsError([(f"weights file '{file}' lacks tensor '{absent[0]}' that {INDEX} places there", None)])
    return files


def _file_of(tensor: str, files: dict[str, list[str]]) -> str:
    for file, tensors in files.items():
        if tensor in tensors:
            return file
    return next(iter(files), SINGLE)


def _natural(name: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _listed(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names, key=_natural)
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _layers(names: Iterable[str]) -> set[int]:
    return {int(m.group(1)) for n in names if (m := _LAYER.search(n))}


def loading_problems(info: dict, files: dict[str, list[str]], config_layers: int) -> list[tuple[str, str | None]]:
    """Diagnostics (message, hint) for transformers' loading report `info` (see the module docstring)."""
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    problems: list[tuple[str, str | None]] = []
    stored_layers = _layers(t for tensors in files.values() for t in tensors)
    layer_hint = None
    if stored_layers and max(stored_layers) + 1 != config_layers:
        layer_hint = (
            f"config.json says num_hidden_layers {config_layers}, but the weights hold "
            f"{max(stored_layers) + 1} layers; fix the config or give the matching weights"
        )
    where = ", ".join(files) or "the weights"
    if missing:
        problems.append(
            (
                f"{len(missing)} tensor(s) the config expects are missing from {where}: {_listed(missing)}",
                layer_hint or "the weights belong to another model or are incomplete",
            )
        )
    if unexpected:
        by_file: dict[str, list[str]] = {}
        for tensor in unexpected:
            by_file.setdefault(_file_of(tensor, files), []).append(tensor)
        for file, tensors in by_file.items():
            problems.append(
                (
                    f"{len(tensors)} tensor(s) in {file} are not part of the model the config describes: "
                    + _listed(tensors),
                    layer_hint or "the config does not describe these weights",
                )
            )
    if mismatched:
        mismatched.sort(key=lambda m: _natural(str(m[0])))
        shown = "; ".join(
            f"'{tensor}' in {_file_of(tensor, files)} is {tuple(stored)}, the config needs {tuple(expected)}"
            for tensor, stored, expected in mismatched[:3]
        )
        more = f"; and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        problems.append(
            (
                f"{len(mismatched)} tensor(s) have shapes the config does not expect: {shown}{more}",
                "config.json and the weights describe different models",
            )
        )
    return problems
