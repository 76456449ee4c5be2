"""Loading a resolved model spec (surgery.models.specs): its config, or its weights.

`load_config` reads the config only (for check/plan); `load_model` loads weights in fp32 with
eager attention (the reference the exported graph is verified against). Remote code is never
trusted implicitly.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery.models import builtin
from surgery.models.specs import ModelSpec, ModelSpecError, first_line, hub_folder, hub_offline
from surgery.models.tokenizer import ModelTokenizer
from surgery.models.weights import INDEX, SINGLE, WeightsError, loading_problems, weight_files


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
            return AutoConfig.from_pretrained(spec.location, trust_remote_code=False, local_files_only=hub_offline())
        return AutoConfig.from_pretrained(spec.location, trust_remote_code=False)
    except Exception as error:  # transformers raises many kinds for missing or unreachable models
        refusal = _known_unsupported(spec)
        if refusal is not None:
            raise ModelSpecError(*refusal) from error
        hint = (
            "the hub is unreachable and the model is not in the local Hugging Face cache; "
            "download it and give its folder"
            if spec.kind == "hub" and hub_offline()
            else None
        )
        raise ModelSpecError(f"cannot read the config of '{spec.text}': {first_line(error)}", hint) from error


def _known_unsupported(spec: ModelSpec) -> tuple[str, str] | None:
    """(message, hint) for a local folder whose config transformers cannot read because it names a
    family surgery knows it does not support (InternLM's remote-code configs), else None."""
    import json

    from surgery import architectures

    try:
        model_type = json.loads((Path(spec.location) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if architectures.not_supported_because(str(model_type)) is None:
        return None
    return architectures.refusal(spec.text, str(model_type))


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
            folder = hub_folder(spec, progress)
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
            f"cannot load the weights of '{spec.text}': {first_line(error)}",
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
            f"cannot load the tokenizer of '{spec.text}': {first_line(error)}",
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
    weights = LazyWeights(model, checkpoint, made)
    # Buffers the checkpoint holds (LFM2-MoE's expert selection bias) are small: read them now,
    # where the model's init would otherwise leave its own values.
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in stored and buffer.device.type != "meta":
                buffer.copy_(weights.load(name, buffer.dtype))
    return model.eval(), weights


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
                f"cannot read the GGUF file '{path.name}': {first_line(error)}",
                "the file is damaged or not a GGUF model transformers can read",
            ) from error
    return target
