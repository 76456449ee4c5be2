"""Run onnxruntime-genai's model builder on a Gemma 3 folder saved by transformers 5.

The builder (0.18) reads Gemma 3's RoPE bases from the flat config fields of transformers 4
(`rope_theta`, `rope_local_base_freq`); transformers 5 saves them nested per layer type in
`rope_parameters`, on which the builder fails with KeyError 'rope_type'. This shim copies the
two bases into the fields the builder reads and then runs it unchanged:

    python benchmarks/genai_builder_compat.py -i <hf folder> -o <out> -p fp32 -e cpu
"""

from __future__ import annotations

import os
import runpy
import sys

import onnxruntime_genai.models

# builder.py imports its builders as the top-level package `builders` (its folder on sys.path).
sys.path.insert(0, os.path.dirname(onnxruntime_genai.models.__file__))
from builders import gemma  # noqa: E402

_original_init = gemma.Gemma3Model.__init__


def _init(self, config, *args, **kwargs):
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        config.rope_theta = rope["full_attention"]["rope_theta"]
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        # The flat form the builder's generic reader expects (the global layers' RoPE).
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    _original_init(self, config, *args, **kwargs)


gemma.Gemma3Model.__init__ = _init
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
