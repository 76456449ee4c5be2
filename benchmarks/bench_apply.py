"""Benchmark: `surgery apply` against onnxruntime-genai's model builder on SmolLM2-135M.

Measured in one run, on this machine:
1. wall time (median of repeated, alternating runs) and peak memory (max RSS) of
   `surgery apply examples/drop-attention.surg`
   (with its default verification, and with --no-verify) and of
   `python -m onnxruntime_genai.models.builder -i <hf folder> -o <out> -p fp32 -e cpu`;
2. decode latency, ms per token after a 256-token prompt, 2 threads, batch 1, of our export of
   the unmodified model against the builder's fp32 model (and of the drop-attention output).
Each command runs in a fresh process whose peak RSS is read with getrusage(RUSAGE_CHILDREN).
A shared 2-core machine drifts by 30% between minutes, so latency is measured in many short
rounds that visit every model in turn; reported are the median and the best round per model,
and the median over rounds of each model's time relative to the builder's in the same round.

    python benchmarks/bench_apply.py [--json bench-results/apply.json] [--steps 48] [--rounds 12]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import measure, paired_latency, write_result  # noqa: E402

from surgery.backend.runtime import OnnxCausalLM  # noqa: E402
from surgery.models import builtin  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "apply.json"))
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--export-repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    hf_folder = builtin.smollm2_folder()  # converted once, outside the timed runs
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-"))
    surgery = [sys.executable, "-m", "surgery"]
    example = str(REPO / "examples" / "drop-attention.surg")
    unmodified = work / "unmodified.surg"
    unmodified.write_text('model "smollm2-135m"\nexport onnx\n')

    builder_cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder)]
    commands = {
        "surgery apply drop-attention (verified)": [*surgery, "apply", example, "-o", str(work / "ours"), "--force"],
        "surgery apply drop-attention --no-verify": [
            *surgery, "apply", example, "-o", str(work / "ours-nv"), "--no-verify", "--force",
        ],
        "ort-genai builder fp32 (unmodified)": [
            *builder_cmd, "-o", str(work / "builder"), "-p", "fp32", "-e", "cpu", "-c", str(work / "builder-cache"),
        ],
        "surgery apply unmodified --no-verify": [
            *surgery, "apply", str(unmodified), "-o", str(work / "base"), "--no-verify", "--force",
        ],
    }  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(args.export_repeats):
        for name, command in commands.items():
            runs[name].append(measure(command))
    export_rows = {
        name: {
            "seconds": round(statistics.median(r["seconds"] for r in rows), 2),
            "peak_gb": max(r["peak_gb"] for r in rows),
            "runs_seconds": [r["seconds"] for r in rows],
        }
        for name, rows in runs.items()
    }

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    text = (REPO / "benchmarks" / "prompt.txt").read_text()
    prompt = np.array(tokenizer(text)["input_ids"][: args.prompt_tokens], dtype=np.int64)
    assert len(prompt) == args.prompt_tokens, "prompt text too short"

    def loader(folder: Path):
        return lambda: OnnxCausalLM(str(folder), threads=args.threads)

    loaders = {
        "surgery export, unmodified": loader(work / "base"),
        "ort-genai builder fp32": loader(work / "builder"),
        "surgery drop-attention (24 attention layers)": loader(work / "ours"),
    }
    latency, rounds = paired_latency(loaders, prompt, args.steps, args.rounds, "ort-genai builder fp32")
    latency = {
        name: {**{k: v for k, v in row.items() if not k.startswith("relative")},
               "relative_to_builder": row["relative_to_ort-genai builder fp32"]}
        for name, row in latency.items()
    }  # fmt: skip

    print(f"\nSmolLM2-135M-Instruct, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"\n{'export (median of runs; peak = max)':48} {'wall s':>8} {'peak GB':>8}   runs")
    for name, row in export_rows.items():
        runs_text = ", ".join(f"{s:.2f}" for s in row["runs_seconds"])
        print(f"{name:48} {row['seconds']:8.2f} {row['peak_gb']:8.3f}   {runs_text}")
    print(f"\n{'decode, 256-token prompt, batch 1':48} {'median':>8} {'best':>8} {'vs builder':>11}")
    for name, row in latency.items():
        print(f"{name:48} {row['median_ms']:8.2f} {row['best_ms']:8.2f} {row['relative_to_builder']:10.3f}x")

    result = {
        "model": "smollm2-135m",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "protocol": {
            "prompt_tokens": args.prompt_tokens,
            "decode_steps": args.steps,
            "rounds": args.rounds,
            "threads": args.threads,
            "batch": 1,
        },
        "export": export_rows,
        "decode_ms_per_token": latency,
        "decode_rounds": rounds,
    }
    write_result(args.json, result)


if __name__ == "__main__":
    main()
