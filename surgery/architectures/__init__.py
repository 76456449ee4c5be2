"""The registry of architecture descriptions: Hugging Face `model_type` -> `Architecture`.

Adding a family is a module with its declaration and one line below.
"""

from __future__ import annotations

import difflib

from surgery.architectures.deepseek_v2 import DEEPSEEK_V2
from surgery.architectures.description import Architecture
from surgery.architectures.ernie4_5 import ERNIE4_5
from surgery.architectures.gemma import GEMMA
from surgery.architectures.gemma2 import GEMMA2
from surgery.architectures.gemma3 import GEMMA3
from surgery.architectures.glm import GLM
from surgery.architectures.glm4 import GLM4
from surgery.architectures.gpt_oss import GPT_OSS
from surgery.architectures.granite import GRANITE
from surgery.architectures.hunyuan_v1_dense import HUNYUAN_V1_DENSE
from surgery.architectures.lfm2 import LFM2
from surgery.architectures.lfm2_moe import LFM2_MOE
from surgery.architectures.llama import LLAMA
from surgery.architectures.mistral import MISTRAL
from surgery.architectures.mixtral import MIXTRAL
from surgery.architectures.nemotron import NEMOTRON
from surgery.architectures.olmo import OLMO
from surgery.architectures.olmo2 import OLMO2
from surgery.architectures.olmoe import OLMOE
from surgery.architectures.phi3 import PHI3
from surgery.architectures.phimoe import PHIMOE
from surgery.architectures.qwen2 import QWEN2
from surgery.architectures.qwen2_moe import QWEN2_MOE
from surgery.architectures.qwen3 import QWEN3
from surgery.architectures.qwen3_moe import QWEN3_MOE
from surgery.architectures.smollm3 import SMOLLM3

REGISTRY: dict[str, Architecture] = {
    a.model_type: a
    for a in (LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, GEMMA2, GEMMA3, PHI3, GRANITE,
              OLMO, OLMO2, SMOLLM3, GEMMA, GLM, GLM4, ERNIE4_5, NEMOTRON, HUNYUAN_V1_DENSE, GPT_OSS,
              DEEPSEEK_V2, PHIMOE, LFM2, LFM2_MOE)
}


# Families known not to be supported, and why (no "did you mean" for these: they are not misspelt).
NOT_SUPPORTED = {
    "internlm2": "it loads only as remote code, which surgery never runs",
    "internlm3": "it loads only as remote code, which surgery never runs",
}


def lookup(model_type: str) -> Architecture | None:
    """The description of `model_type`, or None when no family declares it."""
    return REGISTRY.get(model_type)


def not_supported_because(model_type: str) -> str | None:
    """Why a known family is not supported, or None for one surgery has no word on."""
    return NOT_SUPPORTED.get(model_type)


def closest(model_type: str) -> str | None:
    """The registered model type nearest to `model_type` (for "did you mean"), if any is close:
    one it is a prefix of first ("gemma3" is Gemma 3's multimodal config: "gemma3_text", not
    "gemma2"), else the closest spelling."""
    names = list(REGISTRY)
    extended = [name for name in names if name.startswith(model_type)]
    if extended:
        return sorted(extended, key=len)[0]
    matches = difflib.get_close_matches(model_type, names, n=1, cutoff=0.6)
    if not matches:  # a longer spelling of a registered name is a near miss too
        matches = sorted((name for name in names if model_type.startswith(name)), key=len)[:1]
    return matches[0] if matches else None


def refusal(text: str, model_type: str) -> tuple[str, str]:
    """(message, hint) refusing model `text` of an unsupported `model_type`: the reason where the
    family is known not to be supported, else the nearest registered name; the supported list."""
    because = NOT_SUPPORTED.get(model_type)
    near = None if because else closest(model_type)
    message = f"cannot compile '{text}': architecture '{model_type}' is not supported"
    hint = (f"did you mean '{near}'? " if near else "") + "supported architectures: " + ", ".join(sorted(REGISTRY))
    return message + (f" ({because})" if because else ""), hint


def unknown_architecture(model_type: str) -> str:
    """The message for a model type no description covers, with the nearest registered one."""
    message = f"architecture '{model_type}' is not supported; supported: " + ", ".join(sorted(REGISTRY))
    if model_type in NOT_SUPPORTED:
        return f"architecture '{model_type}' is not supported: {NOT_SUPPORTED[model_type]}"
    near = closest(model_type)
    return message + (f" (did you mean '{near}'?)" if near else "")
