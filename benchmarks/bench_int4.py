"""Benchmark: int4 SmolLM2-135M, ours (with and without the quantized embedding) against the builder's.

Measured in one run, on this machine:
1. file size (model.onnx + model.onnx.data) and perplexity on WikiText-2 test (the first
   `--tokens` tokens, chunked windows of 512, onnxruntime) of
   - `quantize layers * to int4 symmetric` + `quantize head to int4 symmetric`
     (block 32, accuracy_level 4: the builder's settings),
   - the same + `quantize embedding to int4 symmetric` (GatherBlockQuantized, sharing the
     tied head's tensors),
   - `python -m onnxruntime_genai.models.builder -p int4 -e cpu` of the same weights, with
     each `--builder-algos` value as its `algo_config` (default: `default`, round to nearest,
     and `k_quant_mixed`, llama.cpp's mixed strategy: k-quant int4 with int8 for the head and
     the most sensitive layers);
2. decode latency, ms per token after a 256-token prompt, batch 1, in rounds that open the
   models afresh in a rotated order (benchmarks/common.py).

    python benchmarks/bench_int4.py [--json bench-results/int4.json] [--tokens 16384] [--rounds 12]
                                    [--builder-algos default k_quant_mixed]
"""

from __future__ import annotations

import argparse
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

from common import apply_recipe, paired_latency, size_mb, write_result  # noqa: E402

from surgery.backend.evaluate import eval_tokens, onnx_logits, perplexity  # noqa: E402
from surgery.backend.runtime import OnnxCausalLM  # noqa: E402
from surgery.data import resolve_text  # noqa: E402
from surgery.models import builtin  # noqa: E402

INT4 = "quantize layers * to int4 symmetric\nquantize head to int4 symmetric\n"
RECIPES = {
    "surgery int4 (layers + head)": INT4,
    "surgery int4 + embedding": INT4 + "quantize embedding to int4 symmetric\n",
}
BUILDER = "ort-genai builder int4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "int4.json"))
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens of WikiText-2 test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--builder-algos", nargs="+", default=["default", "k_quant_mixed"], metavar="ALGO",
                        help="the builder's algo_config values to build (the first is the baseline)")  # fmt: skip
    args = parser.parse_args()
    started = time.perf_counter()

    hf_folder = builtin.smollm2_folder()
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-int4-"))
    folders = {name: apply_recipe(work, name, 'model "smollm2-135m"\n' + body) for name, body in RECIPES.items()}
    builds = {}
    for algo in args.builder_algos:
        name = BUILDER if algo == args.builder_algos[0] else f"{BUILDER} {algo}"
        folders[name] = work / f"builder-int4-{algo}"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(folders[name]),
             "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache"), "--extra_options", f"algo_config={algo}"],
            check=True, capture_output=True,
        )  # fmt: skip
        builds[name] = {"algo_config": algo, "seconds": round(time.perf_counter() - start, 1)}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    tokens = eval_tokens(tokenizer, resolve_text("wikitext-2-test"), args.tokens)
    rows = {}
    for name, folder in folders.items():
        ppl = perplexity(onnx_logits(str(folder), args.threads), tokens).perplexity
        rows[name] = {"perplexity": round(ppl, 3), "mb": round(size_mb(folder), 1)}
        print(f"{name}: {rows[name]}", flush=True)

    text = (REPO / "benchmarks" / "prompt.txt").read_text()
    prompt = np.array(tokenizer(text)["input_ids"][:256], dtype=np.int64)
    loaders = {name: partial(OnnxCausalLM, str(folder), threads=args.threads) for name, folder in folders.items()}
    latency, rounds = paired_latency(loaders, prompt, args.steps, args.rounds, BUILDER)

    print(f"\nSmolLM2-135M-Instruct, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"perplexity: WikiText-2 test, {tokens.scored()} scored tokens, windows of {tokens.window}\n")
    header = f"{'model':32} {'MB':>7} {'ppl':>8} {'vs builder':>11} {'ms/token':>9} {'best':>7} {'vs builder':>11}"
    print(header)
    base = rows[BUILDER]["perplexity"]
    for name, row in rows.items():
        lat = latency[name]
        print(
            f"{name:32} {row['mb']:7.1f} {row['perplexity']:8.3f} {row['perplexity'] / base - 1:+10.2%} "
            f"{lat['median_ms']:9.2f} {lat['best_ms']:7.2f} {lat[f'relative_to_{BUILDER}']:10.3f}x"
        )
    write_result(
        args.json,
        {
            "model": "smollm2-135m",
            "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
            "protocol": {
                "tokens": tokens.scored(),
                "window": tokens.window,
                "prompt_tokens": 256,
                "decode_steps": args.steps,
                "rounds": args.rounds,
                "threads": args.threads,
            },  # fmt: skip
            "models": rows,
            "builder_builds": builds,
            "decode_ms_per_token": latency,
            "decode_rounds": rounds,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
