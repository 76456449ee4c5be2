"""Benchmark: does ordering by importance beat naive choices? SmolLM2-135M, WikiText-2.

Measured in one run, on this machine (calibration: WikiText-2 valid, the recipes' default
`calibrate`; evaluation: WikiText-2 test, `--tokens` tokens in windows of 512, chunked, the
protocol of `surgery eval`):

1. `surgery importance --metric similarity,lim,zd` with the default calibration: wall time and
   peak memory in a fresh process (target: under 90 s on 2 cores).
2. Dropping the attention of 8 layers: the 8 least important by similarity, the last 8, and
   3 seeded random sets of 8; perplexity of each output against the unmodified export.
3. Mixed int8/int4 quantization of the decoder layers (the head and embedding stay fp32):
   25% and 50% of the layers at int8, the most important by LIM (the paper's order), the
   reverse order, and ZD's order; all-int4, all-int8 and fp32. Perplexity, exact average bits
   per quantized weight, file size.
4. Decode latency of the all-int4 output (layers and head, symmetric, block 32, as the
   builder does) against onnxruntime-genai's `-p int4 -e cpu` model of the same base, in
   alternating rounds (ms/token after a 256-token prompt, 2 threads, batch 1).

    python benchmarks/bench_importance.py [--json bench-results/importance.json] [--tokens 16384]
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

from common import apply_recipe, measure, paired_latency, size_mb, write_result  # noqa: E402

from surgery.backend.evaluate import eval_tokens, onnx_logits, perplexity  # noqa: E402
from surgery.backend.runtime import OnnxCausalLM  # noqa: E402
from surgery.data import resolve_text  # noqa: E402
from surgery.models import builtin  # noqa: E402

MODEL = 'model "smollm2-135m"\n'


def drop_recipes(seeds: tuple[int, ...]) -> dict[str, str]:
    recipes = {
        "least important 8 by similarity": "drop attention least important 8 by similarity\n",
        "last 8": "drop attention layers last 8\n",
    }
    for seed in seeds:
        layers = sorted(int(x) for x in np.random.default_rng(seed).choice(30, size=8, replace=False))
        recipes[f"random 8 (seed {seed}): {','.join(map(str, layers))}"] = (
            f"drop attention layers {', '.join(map(str, layers))}\n"
        )
    return recipes


def mixed(source: str, high: str, share: int) -> str:
    return f"quantize layers by {source} {{\n    {high} important {share}% -> int8\n    rest -> int4\n}}\n"


QUANT_RECIPES = {
    "fp32": "",
    "all int8": "quantize layers * to int8\n",
    "all int4": "quantize layers * to int4\n",
    "25% int8, most important by LIM": mixed("lim", "most", 25),
    "25% int8, least important by LIM (reverse)": mixed("lim", "least", 25),
    "25% int8, most important by ZD": mixed("zd", "most", 25),
    "50% int8, most important by LIM": mixed("lim", "most", 50),
    "50% int8, least important by LIM (reverse)": mixed("lim", "least", 50),
    "50% int8, most important by ZD": mixed("zd", "most", 50),
}
INT4_LIKE_BUILDER = "quantize layers * to int4 symmetric\nquantize head to int4 symmetric\n"


def apply(work: Path, name: str, body: str) -> Path:
    """`surgery apply` of `body` on SmolLM2 in a fresh process; returns the output folder."""
    return apply_recipe(work, name, MODEL + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "importance.json"))
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens of WikiText-2 test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()

    hf_folder = builtin.smollm2_folder()
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-importance-"))
    started = time.perf_counter()

    importance = measure(
        [sys.executable, "-m", "surgery", "importance", "--metric", "similarity,lim,zd", "--no-cache",
         "-o", str(work / "importance.json")]
    )  # fmt: skip
    print(f"surgery importance (similarity, lim, zd; default calibration): {importance}", flush=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    tokens = eval_tokens(tokenizer, resolve_text("wikitext-2-test"), args.tokens)

    def evaluate(folder: Path) -> float:
        return round(perplexity(onnx_logits(str(folder), args.threads), tokens).perplexity, 3)

    base = apply(work, "fp32", "")
    base_ppl = evaluate(base)
    drops = {"none (unmodified export)": {"perplexity": base_ppl}}
    for name, body in drop_recipes((0, 1, 2)).items():
        out = apply(work, name, body)
        report = json.loads((out / "surgery.json").read_text())
        drops[name] = {"perplexity": evaluate(out), "layers": report["kv_cache"]["removed_layers"]}
        print(f"drop attention, {name}: {drops[name]}", flush=True)

    quant = {}
    for name, body in QUANT_RECIPES.items():
        out = base if not body else apply(work, name, body)
        row: dict = {"perplexity": base_ppl if not body else evaluate(out), "mb": round(size_mb(out), 1)}
        q = json.loads((out / "surgery.json").read_text()).get("quantization")
        if q:
            row["int8_layers"] = q["widths"].get("int8", {}).get("linears", 0) // 5
            row["bits_nominal"] = round(q["quantized_linears_nominal_bits"], 3)
            row["bits_stored"] = round(q["quantized_linears_storage_bits"], 3)
            row["model_bits_stored"] = round(q["model_storage_bits"], 3)
        quant[name] = row
        print(f"quantize, {name}: {row}", flush=True)

    ours_int4 = apply(work, "int4 like builder", INT4_LIKE_BUILDER)
    builder = work / "builder-int4"
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(builder),
         "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")],
        check=True, capture_output=True,
    )  # fmt: skip
    int4_rows = {
        "surgery all-int4 (layers + head)": {"perplexity": evaluate(ours_int4), "mb": round(size_mb(ours_int4), 1)},
        "ort-genai builder int4": {"perplexity": evaluate(builder), "mb": round(size_mb(builder), 1)},
    }
    text = (REPO / "benchmarks" / "prompt.txt").read_text()
    prompt = np.array(tokenizer(text)["input_ids"][:256], dtype=np.int64)
    models = {
        "builder": partial(OnnxCausalLM, str(builder), threads=args.threads),
        "surgery all-int4": partial(OnnxCausalLM, str(ours_int4), threads=args.threads),
        "surgery fp32": partial(OnnxCausalLM, str(base), threads=args.threads),
    }
    latency, rounds = paired_latency(models, prompt, args.steps, args.rounds, "builder")

    print(f"\nSmolLM2-135M-Instruct, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"evaluation: WikiText-2 test, {tokens.scored()} scored tokens, chunked windows of {tokens.window}\n")
    print(
        f"surgery importance, default calibration: {importance['seconds']:.1f} s, {importance['peak_gb']:.2f} GB peak"
    )
    print(f"\n{'drop attention of 8 layers':62} {'perplexity':>10}")
    for name, row in drops.items():
        print(f"{name:62} {row['perplexity']:10.2f}")
    print(f"\n{'quantize decoder layers':46} {'int8 layers':>11} {'bits':>6} {'stored':>7} {'ppl':>8} {'MB':>7}")
    for name, row in quant.items():
        print(
            f"{name:46} {row.get('int8_layers', '-'):>11} {row.get('bits_nominal', 32):>6} "
            f"{row.get('bits_stored', 32):>7} {row['perplexity']:8.2f} {row['mb']:7.1f}"
        )
    print(f"\n{'int4 vs onnxruntime-genai':34} {'ppl':>8} {'MB':>7} {'ms/token':>9} {'best':>7} {'vs builder':>11}")
    for (name, row), key in zip(int4_rows.items(), ("surgery all-int4", "builder"), strict=True):
        lat = latency[key]
        print(
            f"{name:34} {row['perplexity']:8.2f} {row['mb']:7.1f} {lat['median_ms']:9.2f} {lat['best_ms']:7.2f} "
            f"{lat['relative_to_builder']:10.3f}x"
        )
    lat = latency["surgery fp32"]
    print(f"{'surgery fp32 (reference)':34} {base_ppl:8.2f} {size_mb(base):7.1f} {lat['median_ms']:9.2f} "
          f"{lat['best_ms']:7.2f} {lat['relative_to_builder']:10.3f}x")  # fmt: skip

    result = {
        "model": "smollm2-135m",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "evaluation": {"text": "wikitext-2-test", "tokens_scored": tokens.scored(), "window": tokens.window},
        "importance_command": importance,
        "drop_attention_8": drops,
        "quantization": quant,
        "int4_against_builder": {"models": int4_rows, "decode_ms_per_token": latency, "decode_rounds": rounds},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_result(args.json, result)


if __name__ == "__main__":
    main()
