"""Benchmark: Layer Fused Decoding on SmolLM2-135M: context faithfulness, perplexity, latency.

Models, all built by `surgery apply` in this run: the unfused export; static fusion at the
layer `fuse layer auto` picks (lowest calibration IKS among the even layers of the latter
half); dynamic fusion over the same candidates; each fused at weights 0.25, 0.5 and 0.75.
For each: the share of the 250 counterfactual QA items of benchmarks/faithfulness.py whose
greedy answer follows the passage (and the share giving the real-world fact instead),
WikiText-2 test perplexity (chunked, 512-token windows), and decode latency against the
unfused export in alternating rounds (ms/token after a 256-token prompt, 2 threads, batch 1).

    python benchmarks/bench_fusion.py [--json bench-results/fusion.json] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import paired_latency, write_result  # noqa: E402
from faithfulness import generate, score  # noqa: E402

from surgery.backend.evaluate import eval_tokens, onnx_logits, perplexity  # noqa: E402
from surgery.backend.runtime import OnnxCausalLM  # noqa: E402
from surgery.data import resolve_text  # noqa: E402

WEIGHTS = (0.25, 0.5, 0.75)


def apply(work: Path, name: str, body: str) -> Path:
    """`surgery apply` (verified) in a fresh process; returns the output folder."""
    recipe = work / f"{name}.surg"
    recipe.write_text('model "smollm2-135m"\n' + body)
    out = work / name
    subprocess.run([sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force"], check=True,
                   capture_output=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "fusion.json"))
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens of WikiText-2 test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--weights", default=",".join(map(str, WEIGHTS)), help="fusion weights, comma-separated")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency rounds")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-fusion-"))

    folders = {"unfused": apply(work, "unfused", "")}
    for weight in weights:
        for mode, name in (("auto", "static auto"), ("dynamic", "dynamic")):
            recipe = f"fuse layer {mode} into head weight {weight}\n"
            folders[f"{name}, weight {weight}"] = apply(work, f"{mode}-{weight}", recipe)
    plan = json.loads((folders[f"static auto, weight {weights[0]}"] / "surgery.json").read_text())["plan"]
    fuse_step = next(s for s in plan["steps"] if s["action"] == "fuse")
    chosen, iks = fuse_step["layers"][0], fuse_step["parameters"]["scores"]
    print(f"auto chose layer {chosen}; candidate IKS: {iks}", flush=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["unfused"])
    tokens = eval_tokens(tokenizer, resolve_text("wikitext-2-test"), args.tokens)
    items = generate()
    rows = {}
    for name, folder in folders.items():
        faith = score(str(folder), items, threads=args.threads)
        ppl = perplexity(onnx_logits(str(folder), args.threads), tokens).perplexity
        verification = json.loads((folder / "surgery.json").read_text())["verification"]
        rows[name] = {
            "follows_passage": round(faith["accuracy"], 4),
            "parametric": round(faith["parametric_answers"], 4),
            "by_kind": {k: round(v, 3) for k, v in faith["by_kind"].items()},
            "perplexity": round(ppl, 3),
            "verification_max_abs_logit_diff": verification["max_abs_logit_diff"],
            "fusion_ties": verification.get("fusion_ties", 0),
        }
        print(f"{name}: {rows[name]}", flush=True)

    text = (REPO / "benchmarks" / "prompt.txt").read_text()
    prompt = np.array(tokenizer(text)["input_ids"][:256], dtype=np.int64)
    timed = ("unfused", f"static auto, weight {weights[0]}", f"dynamic, weight {weights[0]}")
    models = {name: partial(OnnxCausalLM, str(folders[name]), threads=args.threads) for name in timed}
    latency, rounds = (
        ({}, {}) if args.no_latency else paired_latency(models, prompt, args.steps, args.rounds, "unfused")
    )

    print(f"\nSmolLM2-135M-Instruct, {os.cpu_count()} cores; auto-chosen layer {chosen}")
    print(f"faithfulness: {len(items)} items; perplexity: WikiText-2 test, {tokens.scored()} tokens, windows of 512\n")
    print(f"{'model':28} {'follows passage':>16} {'parametric':>11} {'perplexity':>11}")
    for name, row in rows.items():
        print(f"{name:28} {row['follows_passage']:16.1%} {row['parametric']:11.1%} {row['perplexity']:11.2f}")
    print(f"\n{'decode latency':28} {'median ms':>10} {'best':>8} {'vs unfused':>11}")
    for name, row in latency.items():
        print(f"{name:28} {row['median_ms']:10.2f} {row['best_ms']:8.2f} {row['relative_to_unfused']:10.3f}x")
    result = {
        "model": "smollm2-135m",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "auto_layer": chosen,
        "candidate_iks": iks,
        "items": len(items),
        "perplexity_tokens": tokens.scored(),
        "models": rows,
        "decode_ms_per_token": latency,
        "decode_rounds": rounds,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_result(args.json, result)


if __name__ == "__main__":
    main()
