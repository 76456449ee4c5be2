"""Benchmark: SmolLM2-135M split into experts, then merged or pruned: perplexity, size, latency.

Every model is built by `surgery apply` (verified against PyTorch) in this run:
- dense: the unmodified model;
- calibration for expert statistics: --samples x 256 tokens of WikiText-2 valid (default 16);
- for each top K in --top-k: every MLP split into 8 experts (`split mlp layers * into 8
  experts top K`), unmerged, and then in every layer, to 6 and to 4 experts:
  merged with output grouping + frequency weighting (HC-SMoE's grouping), router grouping
  (MC-SMoE's), output grouping + uniform weighting, and pruned by frequency;
- for top 8, merged to 4 with output grouping and Sub-MoE rank truncation to 50%.
For each: WikiText-2 test perplexity (chunked, 512-token windows, onnxruntime), parameters,
expert parameters, model file size; then decode latency (ms/token after a 256-token prompt,
batch 1) of the merged 8->4 models against the unmerged split, in alternating rounds.

    python benchmarks/bench_moe.py [--json bench-results/moe.json] [--tokens 8192] [--top-k 8,6]
                                   [--layers "*"|"20..29"] [--no-latency]
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

from surgery.backend.evaluate import eval_tokens, onnx_logits, perplexity  # noqa: E402
from surgery.backend.runtime import OnnxCausalLM  # noqa: E402
from surgery.data import resolve_text  # noqa: E402

METHODS = {
    "merge: output grouping, frequency weighting": "merge experts {at} to {m} grouping output weighting frequency",
    "merge: router grouping, frequency weighting": "merge experts {at} to {m} grouping router weighting frequency",
    "merge: output grouping, uniform weighting": "merge experts {at} to {m} grouping output weighting uniform",
    "prune by frequency": "prune experts {at} to {m} by frequency",
}


def apply(work: Path, name: str, body: str) -> Path:
    """`surgery apply` (verified) in a fresh process; returns the output folder."""
    recipe = work / f"{name}.surg"
    recipe.write_text('model "smollm2-135m"\n' + body)
    out = work / name
    done = subprocess.run([sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force"],
                          capture_output=True, text=True)  # fmt: skip
    # Exit 3: verification failed but the output is kept; the table reports its logit difference.
    if done.returncode not in (0, 3):
        raise SystemExit(f"{name} failed:\n{done.stderr}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "moe.json"))
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens of WikiText-2 test")
    parser.add_argument("--top-k", default="8,6", help="top K values of the split, comma-separated")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples (x 256 tokens) for statistics")
    parser.add_argument("--layers", default="*", help="layers whose experts are merged or pruned (default: all)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-moe-"))

    recipes = {"dense": ""}
    calibrate = f'calibrate on "valid" samples {args.samples} length 256\n'
    for k in (int(v) for v in args.top_k.split(",")):
        split = calibrate + f"split mlp layers * into 8 experts top {k}\n"
        recipes[f"split 8 top {k}"] = split
        for m in (6, 4):
            for method, statement in METHODS.items():
                recipe = split + statement.format(m=m, at=f"layers {args.layers}") + "\n"
                recipes[f"split 8 top {k}, {m} experts, {method}"] = recipe
        if k == 8:
            recipes["split 8 top 8, 4 experts, merge: output grouping, frequency, rank 50%"] = (
                split + f"merge experts layers {args.layers} to 4 grouping output rank 50%\n"
            )

    from transformers import AutoTokenizer

    folders, rows, tokens = {}, {}, None
    for number, (name, body) in enumerate(recipes.items()):
        begun = time.perf_counter()
        folders[name] = folder = apply(work, f"model-{number}", body)
        if tokens is None:
            tokens = eval_tokens(AutoTokenizer.from_pretrained(folder), resolve_text("wikitext-2-test"), args.tokens)
        report = json.loads((folder / "surgery.json").read_text())
        after = report["model"]["after"]
        rows[name] = {
            "recipe": [line for line in body.strip().splitlines() if not line.startswith("calibrate")],
            "perplexity": round(perplexity(onnx_logits(str(folder), args.threads), tokens).perplexity, 3),
            "parameters": after["parameters"],
            "expert_parameters": after.get("expert_parameters", 0),
            "model_bytes": after["bytes"],
            "verification_passed": report["verification"]["passed"],
            "verification_max_abs_logit_diff": report["verification"]["max_abs_logit_diff"],
            "apply_seconds": round(report["timings_s"]["total"], 1),
        }
        print(f"[{time.perf_counter() - begun:5.0f} s] {name}: {rows[name]}", flush=True)

    # Decode latency: the merged 8->4 models against the unmerged split they come from.
    baseline = "split 8 top 8" if "split 8 top 8" in folders else next(n for n in folders if n.startswith("split"))
    timed = [baseline] + [n for n in folders if n.startswith(baseline + ", 4 experts, merge")] + ["dense"]
    text = (REPO / "benchmarks" / "prompt.txt").read_text()
    tokenizer = AutoTokenizer.from_pretrained(folders["dense"])
    prompt = np.array(tokenizer(text)["input_ids"][:256], dtype=np.int64)
    models = {name: partial(OnnxCausalLM, str(folders[name]), threads=args.threads) for name in timed}
    latency, rounds = ({}, {}) if args.no_latency else paired_latency(models, prompt, args.steps, args.rounds, baseline)
    relative = f"relative_to_{baseline}"

    print(f"\nSmolLM2-135M-Instruct, {os.cpu_count()} cores, {args.threads} threads")
    print(f"perplexity: WikiText-2 test, {tokens.scored()} tokens, windows of 512\n")
    print(f"{'model':78} {'perplexity':>11} {'params':>12} {'expert params':>14} {'file MB':>8} {'vs PyTorch':>10}")
    for name, row in rows.items():
        print(f"{name:78} {row['perplexity']:11.2f} {row['parameters']:12,} {row['expert_parameters']:14,} "
              f"{row['model_bytes'] / 1e6:8.1f} {row['verification_max_abs_logit_diff']:10.1e}")  # fmt: skip
    print(f"\n{'decode latency':78} {'median ms':>10} {'best':>8} {'vs unmerged':>12}")
    for name, row in latency.items():
        print(f"{name:78} {row['median_ms']:10.2f} {row['best_ms']:8.2f} {row[relative]:11.3f}x")
    result = {
        "model": "smollm2-135m",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
        "perplexity_tokens": tokens.scored(),
        "merged_or_pruned_layers": args.layers,
        "models": rows,
        "decode_ms_per_token": latency,
        "decode_baseline": baseline,
        "decode_rounds": rounds,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_result(args.json, result)


if __name__ == "__main__":
    main()
