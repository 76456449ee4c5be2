"""Resolving a model spec (built-in name, local folder, .gguf file, hub id) and loading it.

`load_config` reads the config only (for check/plan); `load_model` loads weights in fp32 with
eager attention (the reference the exported graph is verified against). Remote code is never
trusted implicitly.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from surgery.diagnostics import HintedError
from surgery.models import builtin
from surgery.models.tokenizer import ModelTokenizer
from surgery.models.weights import INDEX, SINGLE, WeightsError, loading_problems, weight_files

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
def _hub_offline() -> bool:
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


def _hub_folder(spec: ModelSpec, progress) -> str:
    """The local snapshot of a hub model (config, safetensors, tokenizer files), downloaded if needed."""
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    if not offline:
        progress(f"fetching {spec.text} from the Hugging Face hub (safetensors and tokenizer files)")
    try:
        return snapshot_download(spec.location, allow_patterns=_HUB_FILES, local_files_only=offline)
    except Exception as error:  # the hub client raises many kinds for missing, gated or unreachable repos
        hint = "the hub is unreachable; download the model and give its folder" if offline else None
        raise ModelSpecError(f"cannot fetch '{spec.text}' from the hub: {_first_line(error)}", hint) from error


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


def load_config(spec: ModelSpec) -> Any:
    """The model's transformers config, without weights."""
    from transformers import AutoConfig

    if spec.kind == "builtin":
        if spec.location in builtin.PACKAGED:
            return builtin.packaged_config(spec.location)
        return builtin.tiny_config(spec.location)
    try:
        if spec.kind == "gguf":
            path = Path(spec.location)
            converted = _gguf_cache_folder(path)
            if converted is not None and (converted / "config.json").is_file():
                # Converted before: its config.json is the GGUF's, read in milliseconds (parsing
                # the GGUF itself reads its whole tokenizer: 20 s for Qwen2.5-1.5B).
                return AutoConfig.from_pretrained(str(converted))
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if spec.kind == "hub":
            return AutoConfig.from_pretrained(spec.location, trust_remote_code=False, local_files_only=_hub_offline())
        return AutoConfig.from_pretrained(spec.location, trust_remote_code=False)
    except Exception as error:  # transformers raises many kinds for missing or unreachable models
        hint = (
            "the hub is unreachable and the model is not in the local Hugging Face cache; "
            "download it and give its folder"
            if spec.kind == "hub" and _hub_offline()
            else None
        )
        raise ModelSpecError(f"cannot read the config of '{spec.text}': {_first_line(error)}", hint) from error


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


def _first_line(error: Exception) -> str:
    """The first line of a library's error message, cut to a readable length."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:200] + "\u2026"


def load_model(
    spec: ModelSpec,
    progress=print,
    lazy: bool = False,
    checked_before: Callable[[str, Any], bool] | None = None,
    tokenizer_on_use: bool = False,
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, lazy weights or None) in fp32 with eager attention, in eval mode.

    The weights are checked first against their files (headers, sizes), then against the config
    (missing, unexpected, mis-shaped and non-finite tensors); any problem is a WeightsError
    naming the file and tensor, and nothing random is ever filled in silently.

    With `lazy`, a checkpoint whose tensors are the model's parameters one for one is not read:
    the model's parameters stay on the meta device and the returned `LazyWeights` loads them
    when asked (surgery.models.lazy), checked for NaN then. A checkpoint transformers converts
    on loading (per-expert tensors fused into one, renamed keys) is loaded whole as before.
    When `checked_before(folder, architecture)` gives the config record stored when these files
    loaded and passed the description's check before, a family that allows it is built from its
    tensor index without transformers' model or config classes (surgery.models.skeleton). With
    `tokenizer_on_use`, the tokenizer is a `ModelTokenizer` that loads on first use
    (surgery.models.tokenizer): transformers' auto classes are imported only when something
    tokenizes or the model loads through them.
    """
    import torch

    if spec.kind == "builtin" and spec.location not in builtin.PACKAGED:
        tokenizer = builtin.byte_tokenizer()
        handle = ModelTokenizer.loaded(tokenizer) if tokenizer_on_use else tokenizer
        return builtin.tiny_model(spec.location), handle, None
    try:
        if spec.kind == "builtin":
            folder = str(builtin.packaged_folder(spec.location, progress))
        elif spec.kind == "gguf":
            folder = str(_converted_gguf(Path(spec.location), progress))
        elif spec.kind == "hub":
            folder = _hub_folder(spec, progress)
        else:
            folder = spec.location
    except builtin.BuiltinModelError as problem:
        raise ModelSpecError(str(problem), problem.hint) from problem
    files = weight_files(folder)
    if not files:
        raise ModelSpecError(
            f"'{spec.text}' has no safetensors weights ({SINGLE} or {INDEX})",
            "surgery loads safetensors weights only (pickled .bin checkpoints are refused)",
        )
    tokenizer = _model_tokenizer(spec, folder) if tokenizer_on_use else _tokenizer(spec, folder)
    if lazy:
        found = _skeleton(folder, files, checked_before) if checked_before is not None else None
        if found is None:
            config = _config(folder)  # None: the eager load below reports why
            found = _lazy_model(folder, files, config) if config is not None else None
        if found is not None:
            return found[0], tokenizer, found[1]
    from transformers import AutoModelForCausalLM

    try:
        # safetensors only: pickled .bin checkpoints can run code when loaded.
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float32,
            attn_implementation="eager",
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, with the tensor names
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ModelSpecError(
            f"cannot load the weights of '{spec.text}': {_first_line(error)}",
            "surgery loads safetensors weights only (pickled .bin checkpoints are refused)",
        ) from error
    problems = loading_problems(info, files, int(model.config.num_hidden_layers))
    problems += _non_finite(model, files)
    if problems:
        raise WeightsError(problems)
    return model.eval(), tokenizer, None


def _tokenizer(spec: ModelSpec, folder: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelSpecError(
            f"cannot load the tokenizer of '{spec.text}': {_first_line(error)}",
            "a model folder needs its tokenizer files (tokenizer.json and tokenizer_config.json)",
        ) from error


def _model_tokenizer(spec: ModelSpec, folder: str) -> ModelTokenizer:
    """The folder's tokenizer, loaded on first use when its files can be copied as they are;
    loaded now otherwise (a folder without tokenizer.json), so a missing tokenizer is reported
    with the model."""
    handle = ModelTokenizer(lambda: _tokenizer(spec, folder), folder)
    if not handle.copyable():
        handle.get()
    return handle


def _config(folder: str) -> Any | None:
    """The folder's transformers config, or None when transformers cannot read it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _skeleton(folder: str, files: dict[str, list[str]], checked_before: Callable[[str, Any], dict | None]):
    """(module tree, LazyWeights) of a checkpoint checked before, built without transformers'
    model or config classes from the config record its check stored; None when the family or
    the checkpoint does not allow it."""
    import json

    from surgery.architectures import lookup
    from surgery.models.skeleton import FAMILIES, config_from_record, skeleton_model

    try:
        model_type = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # the usual load reports it
    architecture = lookup(str(model_type)) if model_type in FAMILIES else None
    record = checked_before(folder, architecture) if architecture is not None else None
    if record is None:
        return None
    config = config_from_record(record)
    names = architecture.names
    return skeleton_model(folder, files, config, names.body, names.embed, names.head)


def _lazy_model(folder: str, files: dict[str, list[str]], config: Any) -> tuple[Any, Any] | None:
    """(meta-device model, its LazyWeights) when every parameter is a checkpoint tensor, or is made
    from some the way transformers makes it (per-expert tensors stacked into one fused tensor,
    renamed keys: `surgery.models.conversion`), in the config's shapes, and no tensor is left
    over; None otherwise, and the eager load runs instead: it reports what is missing,
    unexpected or mis-shaped with the file and tensor names.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from surgery.models.conversion import sources
    from surgery.models.lazy import Checkpoint, LazyWeights, parameters_on_meta

    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):
        return None  # the eager load reports it
    checkpoint = Checkpoint(folder, files)
    stored = set(checkpoint.names())
    state = model.state_dict(keep_vars=True)  # tied names included (a checkpoint may hold lm_head too)
    parameters = dict(model.named_parameters())
    made = {}
    if not set(parameters) <= stored:  # fused experts or renamed keys: transformers' own table
        made = sources(config.model_type, list(parameters), stored)
        if made is None:
            return None
    used = {t for source in made.values() for group in source.groups for t in group}
    if not stored <= used | set(state):
        return None
    shapes = {name: checkpoint.shape_and_dtype(name)[0] for name in stored}
    for name, param in parameters.items():
        shape = made[name].shape(shapes) if name in made else shapes[name]
        if shape != tuple(param.shape):
            return None
    model.config._name_or_path = folder
    return model.eval(), LazyWeights(model, checkpoint, made)


def tokenizer_without_weights(spec: ModelSpec) -> Any | None:
    """The model's tokenizer when it can be had without loading or fetching weights, else None.

    `check` uses it to count calibration and evaluation tokens exactly: the tiny built-ins'
    byte tokenizer, a model folder's own tokenizer files, or an already converted cache.
    """
    if spec.kind == "builtin" and spec.location not in builtin.PACKAGED:
        # One instance per process, so token counts cached per tokenizer are found again.
        return _TOKENIZERS.setdefault(("byte",), builtin.byte_tokenizer())
    if spec.kind == "folder":
        folder: Path | None = Path(spec.location)
    elif spec.kind == "builtin":
        folder = builtin.cache_dir() / "models" / spec.location
    elif spec.kind == "gguf":
        folder = _gguf_cache_folder(Path(spec.location))
    else:
        return None
    if folder is None:
        return None
    try:
        key = (str(folder), *(_mtime(folder / name) for name in ("tokenizer_config.json", "tokenizer.json")))
    except OSError:  # no tokenizer files
        return None
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        try:
            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception:  # any failure just means: count without the tokenizer
            _TOKENIZERS[key] = None
    return _TOKENIZERS[key]


# Tokenizers `check` loaded, by folder and file times: a process that checks many recipes
# (tests, an editor integration) loads each once.
_TOKENIZERS: dict[tuple, Any] = {}


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def _non_finite(model: Any, files: dict[str, list[str]]) -> list[tuple[str, str | None]]:
    """A problem for every parameter holding NaN or infinity (which no verification would catch)."""
    import torch

    problems = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not bool(torch.isfinite(parameter).all()):
                where = next((file for file, tensors in files.items() if name in tensors), "the weights")
                problems.append((f"tensor '{name}' in {where} holds NaN or infinite values", "the file is damaged"))
    return problems


def _gguf_cache_folder(path: Path) -> Path | None:
    """Where a GGUF file's conversion is cached, keyed by its path, size and mtime."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return builtin.cache_dir() / "models" / f"{path.stem}-{key}"


def _converted_gguf(path: Path, progress) -> Path:
    """A GGUF file is dequantized once into the cache (see `_gguf_cache_folder`)."""
    target = _gguf_cache_folder(path)
    if target is None:
        raise ModelSpecError(f"GGUF file '{path}' cannot be read")
    if not (target / "config.json").exists():
        try:
            builtin.convert_gguf(path, target, progress)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError, struct.error) as error:
            raise ModelSpecError(
                f"cannot read the GGUF file '{path.name}': {_first_line(error)}",
                "the file is damaged or not a GGUF model transformers can read",
            ) from error
    return target
