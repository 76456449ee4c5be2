"""Benchmark: mixture-of-experts layers in plain ONNX ops vs onnxruntime's com.microsoft.MoE.

The exporter can write a softmax-routed MoE layer two ways (docs/moe.md): plain ops, which run
every expert on every token and mix with a dense routing matrix (exact for any routing, also
the grouped routing of merged experts), or onnxruntime's MoE contrib operator, which runs
only each token's top-k experts. This script builds seeded random models in code with the
shapes of real MoEs scaled down (Mixtral-like: 8 experts, top 2; OLMoE-like: 64 experts,
top 8; Qwen2-MoE-like: 8 experts, top 4 plus a shared expert), exports each both ways,
checks both against PyTorch, and times decode (ms/token after a 128-token prompt, batch 1)
and a 256-token prefill, alternating the two exports in rounds.

    python benchmarks/bench_moe_ops.py [--json bench-results/moe-ops.json] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import decode_ms_per_token, write_result  # noqa: E402

from surgery.backend.runtime import OnnxCausalLM  # noqa: E402
from surgery.export.decoder import export_decoder  # noqa: E402
from surgery.export.options import ExportOptions  # noqa: E402
from surgery.ir.graph import DecoderGraph  # noqa: E402
from surgery.models.index import ModelIndex  # noqa: E402

COMMON = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
          "vocab_size": 4096, "max_position_embeddings": 1024}  # fmt: skip
SHAPES = {
    "mixtral-like (8 experts, top 2, I=1408)": (
        "mixtral",
        {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 1408},
    ),
    "olmoe-like (64 experts, top 8, I=256)": (
        "olmoe",
        {"num_experts": 64, "num_experts_per_tok": 8, "intermediate_size": 256, "norm_topk_prob": False},
    ),
    "qwen2-moe-like (8 experts, top 4, I=512, shared 1024)": (
        "qwen2_moe",
        {
            "num_experts": 8,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 1024,
            "decoder_sparse_step": 1,
            "norm_topk_prob": False,
        },
    ),  # fmt: skip
}


def build(architecture: str, fields: dict) -> DecoderGraph:
    """A seeded random model of the given shape, as the exporter's graph."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(architecture, **COMMON, **fields)
    if architecture == "qwen2_moe":
        config.use_sliding_window = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    return DecoderGraph(model, ModelIndex.from_config(architecture, config))


def max_logit_diff(graph: DecoderGraph, model: OnnxCausalLM, ids: np.ndarray) -> float:
    """Largest |logit| difference between PyTorch and the export on one prompt."""
    tensor = torch.from_numpy(ids)[None]
    mask = torch.ones_like(tensor)
    expected = graph.forward(tensor, mask, torch.arange(len(ids))[None])[0].numpy()
    got = model.step(ids[None], mask.numpy(), np.arange(len(ids))[None]).logits[0]
    return float(np.abs(got - expected).max())


def prefill_ms(model: OnnxCausalLM, ids: np.ndarray) -> float:
    """Wall ms of one prompt pass."""
    start = time.perf_counter()
    model.step(ids[None], np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None])
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "moe-ops.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-moe-ops-"))
    rng = np.random.default_rng(0)
    prompt, long_prompt = rng.integers(0, 4096, 128), rng.integers(0, 4096, 256)
    rows = {}
    for shape, (architecture, fields) in SHAPES.items():
        graph = build(architecture, fields)
        models, parity = {}, {}
        for operator in ("plain", "contrib"):
            folder = work / f"{architecture}-{operator}"
            folder.mkdir()
            export_decoder(graph, str(folder), replace(ExportOptions(), moe_operator=operator))
            models[operator] = OnnxCausalLM(str(folder), threads=args.threads)
            parity[operator] = max_logit_diff(graph, models[operator], prompt)
        decode = {name: [] for name in models}
        prefill = {name: [] for name in models}
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
            for name, model in models.items():
                decode[name].append(decode_ms_per_token(model, prompt, args.steps))
                prefill[name].append(prefill_ms(model, long_prompt))
        rows[shape] = {
            name: {
                "decode_ms_per_token": round(statistics.median(decode[name]), 3),
                "prefill_256_ms": round(statistics.median(prefill[name]), 2),
                "max_abs_logit_diff_vs_pytorch": parity[name],
            }
            for name in models
        }
        print(f"{shape}: {rows[shape]}", flush=True)

    print(f"\n{os.cpu_count()} cores, {args.threads} threads; median of {args.rounds} alternating rounds\n")
    print(f"{'shape':55} {'operator':>8} {'decode ms/tok':>14} {'prefill 256 ms':>15} {'vs PyTorch':>11}")
    for shape, by_operator in rows.items():
        for name, row in by_operator.items():
            print(f"{shape:55} {name:>8} {row['decode_ms_per_token']:14.2f} {row['prefill_256_ms']:15.1f} "
                  f"{row['max_abs_logit_diff_vs_pytorch']:11.1e}")  # fmt: skip
    result = {
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
        "common_config": COMMON,
        "shapes": {shape: {"architecture": a, **f} for shape, (a, f) in SHAPES.items()},
        "results": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_result(args.json, result)


if __name__ == "__main__":
    main()
