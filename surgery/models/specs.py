"""What a model spec names: a built-in, a local model folder or .gguf file, or a hub id.

`resolve_spec` decides, from the text alone and what is on disk, checking what a load would
trip over (no config.json, pickled weights only, a model file that is a FIFO) so `check` reports
it; the hub is reached only for a hub id, and only once a model is loaded (`hub_folder`).
`model_cache_folders` names the cache folders a model's files come from: inputs that an output
may never replace.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import stat
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from surgery.diagnostics import HintedError
from surgery.models import builtin

SpecKind = Literal["builtin", "folder", "gguf", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSpecError(HintedError):
    """A spec that names no loadable model; carries a hint for the diagnostic."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: what kind of source, and where."""

    text: str
    kind: SpecKind
    location: str


def resolve_spec(text: str, base_dir: str | None = None) -> ModelSpec:
    """Decide what a spec names. Relative paths are tried against `base_dir` (the recipe's folder)."""
    if text in builtin.BUILTIN_NAMES:
        return ModelSpec(text, "builtin", text)
    candidates = [Path(text).expanduser()]
    if base_dir and not os.path.isabs(text):
        candidates.append(Path(base_dir) / text)
    for path in candidates:
        try:
            found = _local_spec(text, path)
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a path
            found = None
        if found is not None:
            return found
    close = difflib.get_close_matches(text, builtin.BUILTIN_NAMES, n=1, cutoff=0.8)
    if close:  # a misspelt built-in, not a hub id or a path
        known = ", ".join(builtin.BUILTIN_NAMES)
        raise ModelSpecError(f"model '{text}' not found; did you mean '{close[0]}'?",
                             f"the built-ins: {known} (`surgery models` lists them)")  # fmt: skip
    if len(text) <= 200 and _HUB_ID.match(text) and not text.startswith((".", "/")):
        return ModelSpec(text, "hub", text)
    raise ModelSpecError(
        f"model '{text}' not found",
        "use a built-in (" + ", ".join(builtin.BUILTIN_NAMES) + "), a local model folder, a .gguf file, "
        "or a hub id like 'org/name' (`surgery models` lists the built-ins and families)",
    )


_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]


@cache
def hub_offline() -> bool:
    """Whether the hub cannot be reached (HF_HUB_OFFLINE, or no connection within 3 s).

    Asked once per process: offline, every hub access goes to the local cache only, instead of
    the hub client's retries for half a minute per file.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return True
    return False


def hub_folder(spec: ModelSpec, progress) -> str:
    """The local snapshot of a hub model (config, safetensors, tokenizer files), downloaded if needed."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    if not offline:
        progress(f"fetching {spec.text} from the Hugging Face hub (safetensors and tokenizer files)")
    try:
        return snapshot_download(spec.location, allow_patterns=_HUB_FILES, local_files_only=offline)
    except Exception as error:  # the hub client raises many kinds for missing, gated or unreachable repos
        hint = "the hub is unreachable; download the model and give its folder" if offline else None
        raise ModelSpecError(f"cannot fetch '{spec.text}' from the hub: {first_line(error)}", hint) from error


def _local_spec(text: str, path: Path) -> ModelSpec | None:
    """The spec when `path` is a local model (folder or .gguf file); None when nothing is there."""
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(text, "gguf", str(path.resolve()))
    if path.is_dir():
        special = _special_files(path)
        if special:
            raise ModelSpecError(
                f"folder '{text}' has model files that are not regular files: {', '.join(special)}",
                "surgery reads a model's files whole; a FIFO, socket or device would block it or never end",
            )
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"folder '{text}' has no config.json", "a Hugging Face model folder holds config.json and weights"
            )
        if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
            raise ModelSpecError(
                f"folder '{text}' has only pickled .bin weights, no safetensors",
                "surgery loads safetensors only (a pickled checkpoint can run code when loaded); convert it, e.g. "
                "load it with transformers and save_pretrained(..., safe_serialization=True)",
            )
        return ModelSpec(text, "folder", str(path.resolve()))
    if path.exists():
        raise ModelSpecError(f"'{text}' is neither a model folder nor a .gguf file")
    return None


# The files of a model folder that surgery or transformers read (config, weights, index, tokenizer).
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".jinja", ".tiktoken", ".txt")


def _special_files(folder: Path) -> list[str]:
    """Model files in `folder` that are not regular files once links are followed (FIFOs,
    sockets, devices), each named with what it is."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.endswith(_MODEL_FILE_SUFFIXES):
                continue
            try:
                mode = os.stat(entry.path).st_mode
            except OSError:  # a dangling link: reported as missing where it is needed
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
                found.append(f"{entry.name} ({kind})")
    return sorted(found)


def model_cache_folders(spec: ModelSpec) -> list[str]:
    """The cache folders a model's files are read from: surgery's model cache for a packaged
    built-in or a converted GGUF, the Hugging Face cache for a hub id (inputs an output may
    never replace or lie inside)."""
    if spec.kind == "builtin" and spec.location in builtin.PACKAGED or spec.kind == "gguf":
        return [str(builtin.cache_dir() / "models")]
    if spec.kind == "hub":
        from huggingface_hub import constants

        return [str(constants.HF_HUB_CACHE)]
    return []


def first_line(error: Exception) -> str:
    """The first line of a library's error message, cut to a readable length."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:200] + "\u2026"
