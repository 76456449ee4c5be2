"""GPU: decode at long prompts with a float, int8 or int4 KV cache, through onnxruntime-genai-cuda,
on a random-weight model of Qwen2.5-1.5B's shape (28 layers, hidden 1536, 12 query and 2
key/value heads of 128, context 32k; generated on the machine, as ../shared/docs/gpu.md says).

    python benchmarks/bench_kv_gpu.py build   --work /tmp/kv
    python benchmarks/bench_kv_gpu.py measure --work /tmp/kv --lengths 8192 32768 --json OUT

`build` writes the model, then `surgery apply --provider cuda` (verified on CUDA against PyTorch
in fp16) of `export onnx for cuda` with a float cache, `quantize kv-cache to int8` and `to int4`
(scales calibrated on WikiText-2 read byte by byte: the timing does not depend
on the scales), and attention dropped in 7 of 28 layers plus int8.
Since commit 9399c3f `check` refuses a quantized KV cache `for cuda` (docs/recipes.md says why:
onnxruntime's CUDA kernel reads a prompt's keys unrounded, and verification cannot replay its
shared-buffer cache yet), so the int8 and int4 rows build only at that commit, with `--no-verify`
added to the apply line: that is how docs/benchmarks.md's timings were taken (timing only).
`measure` times each through onnxruntime-genai-cuda (bench_gpu.genai_timing: an untimed
warm-up, the prefill of a random prompt, then greedy steps timed one by one, the median step),
in rounds that rotate the order; the KV bytes per token come from each surgery.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_gpu import genai_timing, run  # noqa: E402
from bench_quantize_time import QWEN_1_5B, random_qwen  # noqa: E402

DROPPED = "3, 7, 11, 15, 19, 23, 27"
CALIBRATE = 'calibrate on "wikitext-2-valid" samples 8 length 256\n'
RECIPES = {
    "fp16 cache": "export onnx for cuda\n",
    "int8 cache": CALIBRATE + "quantize kv-cache to int8\nexport onnx for cuda\n",
    "int4 cache": CALIBRATE + "quantize kv-cache to int4\nexport onnx for cuda\n",
    "attention dropped in 7 + int8": CALIBRATE + f"drop attention layers {DROPPED}\nquantize kv-cache to int8\n"
    "export onnx for cuda\n",
}


def random_model(folder: Path) -> None:
    """bench_quantize_time's seeded random model of Qwen2.5-1.5B's shape in fp16, with the tiny
    models' byte-level tokenizer (prompts are token ids; verification's text needs some tokenizer)."""
    sys.path.insert(0, str(REPO))
    from surgery.models.builtin import byte_tokenizer

    random_qwen(folder, folder, QWEN_1_5B["num_hidden_layers"])  # no tokenizer files to copy
    byte_tokenizer().save_pretrained(folder)


def build(work: Path) -> None:
    """The model and our four exports (listed in work/built.json)."""
    work.mkdir(parents=True, exist_ok=True)
    source = work / "qwen-1.5b-shape"
    if not (source / "config.json").exists():
        random_model(source)
    built = {}
    for label, body in RECIPES.items():
        slug = label.replace(" ", "-")
        recipe = work / f"{slug}.surg"
        recipe.write_text(f'model "{source}"\n{body}')
        out = work / slug
        seconds = run([sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force",
                       "--provider", "cuda"], work / "build.log")  # fmt: skip
        report = json.loads((out / "surgery.json").read_text())
        built[label] = {"folder": str(out), "build_seconds": seconds,
                        "kv_bytes_per_token": report["kv_cache"]["after"]["bytes_per_token"],
                        "verification": {k: report["verification"].get(k) for k in ("passed", "max_abs_logit_diff")},
                        "genai": report.get("onnxruntime_genai")}  # fmt: skip
        print(label, built[label], flush=True)
    (work / "built.json").write_text(json.dumps(built, indent=2))


def measure(work: Path, lengths: list[int], rounds: int, steps: int, out_json: str) -> None:
    """Decode ms per token and prefill ms of every export at each prompt length."""
    built = json.loads((work / "built.json").read_text())
    rng = np.random.default_rng(0)
    table: dict = {label: {"kv_bytes_per_token": row["kv_bytes_per_token"]} for label, row in built.items()}
    labels = list(built)
    for length in lengths:
        prompt = rng.integers(1000, QWEN_1_5B["vocab_size"] - 1000, length)
        times = {label: {"prefill": [], "decode": []} for label in labels}
        for index in range(rounds):
            for label in labels[index % len(labels) :] + labels[: index % len(labels)]:
                prefill, decode, _ = genai_timing(built[label]["folder"], prompt, steps)
                times[label]["prefill"].append(prefill)
                times[label]["decode"].append(decode)
        for label in labels:
            table[label][f"prompt_{length}"] = {
                "decode_ms": round(statistics.median(times[label]["decode"]), 3),
                "prefill_ms": round(statistics.median(times[label]["prefill"]), 1),
                "rounds_decode_ms": [round(v, 3) for v in times[label]["decode"]],
                "decode_vs_fp16_cache": round(statistics.median(
                    a / b for a, b in zip(times[label]["decode"], times["fp16 cache"]["decode"], strict=True)), 3),
            }  # fmt: skip
            print(length, label, table[label][f"prompt_{length}"], flush=True)
    result = {"model": "random Qwen2.5-1.5B shape, fp16", "protocol": {"rounds": rounds, "decode_steps": steps},
              "exports": {k: {x: y for x, y in v.items() if x != "folder"} for k, v in built.items()},
              "models": table}  # fmt: skip
    try:
        import onnxruntime as ort

        result["machine"] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=2))
    print(f"\n{'export':32} {'KV B/tok':>9} " + " ".join(f"{'ms@' + str(n):>9} {'vs fp16':>8}" for n in lengths))
    for label, row in table.items():
        cells = " ".join(f"{row[f'prompt_{n}']['decode_ms']:>9.3f} {row[f'prompt_{n}']['decode_vs_fp16_cache']:>7.3f}x"
                         for n in lengths)  # fmt: skip
        print(f"{label:32} {row['kv_bytes_per_token']:>9,} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("build", "measure"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgery-kv-gpu"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--json", default=str(REPO / "bench-results" / "kv-gpu.json"))
    args = parser.parse_args()
    if args.phase == "build":
        build(args.work)
    else:
        measure(args.work, args.lengths, args.rounds, args.steps, args.json)


if __name__ == "__main__":
    main()
