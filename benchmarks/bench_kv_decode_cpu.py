"""CPU: decode ms per token after long prompts (2k, 8k, 32k) with a float, int8 or int4 KV cache
(GroupQueryAttention's, and int4 `pre-rope`), attention dropped in 7 of 28 layers, and both, on
a random-weight model of Qwen2.5-1.5B's shape, through onnxruntime's CPU provider (our runtime:
the `decode at most` protocol's steps).

A decode step's cost does not depend on the values in the cache, so instead of prefilling a
prompt (a 32k prompt takes minutes on a CPU) each measurement starts from a random cache of L
tokens in the export's own layout and codes (float, int8, or packed int4), then times greedy
one-token steps through it (surgery/backend/latency.py `decode_after_cache`, what `measure
decode` reports). The model is random too (timing does not depend on weights). The
longest default is 32,000 tokens, not 32,768: the timed steps must stay inside a 32k context.

    python benchmarks/bench_kv_decode_cpu.py build   --work /tmp/kvcpu
    python benchmarks/bench_kv_decode_cpu.py measure --work /tmp/kvcpu --lengths 2048 8192 32000 --json OUT
    python benchmarks/bench_kv_decode_cpu.py measure --folders "fp cache=DIR" "int8 cache=DIR" ... --json OUT

`build` writes the model and each export with `surgery apply --no-verify` (timing only; the
same recipes are verified on real models in bench_kv_cache.py). `measure` prints a table and
writes JSON: the median step over `--steps` steps after 4 warm-up steps, `--rounds` rounds in
rotating order; `--only` measures some exports (one command per export fits a time limit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from bench_gpu import run  # noqa: E402
from bench_quantize_time import QWEN_1_5B, random_qwen  # noqa: E402

CALIBRATE = 'calibrate on "wikitext-2-valid" samples 8 length 256\n'


def recipes(layers: int) -> dict[str, str]:
    """Export name -> the statements after the model line; every fourth layer from layer 3 drops
    its attention (7 of Qwen's 28)."""
    dropped = ", ".join(map(str, range(3, layers, 4)))
    count = len(range(3, layers, 4))
    return {
        "fp32 cache": "",
        "int8 cache": CALIBRATE + "quantize kv-cache to int8\n",
        "int4 cache": CALIBRATE + "quantize kv-cache to int4\n",
        "int4 pre-rope cache": CALIBRATE + "quantize kv-cache to int4 pre-rope\n",
        f"attention dropped in {count}": f"drop attention layers {dropped}\n",
        f"attention dropped in {count} + int8": CALIBRATE + f"drop attention layers {dropped}\n"
        "quantize kv-cache to int8\n",
    }


def build(work: Path, layers: int, only: list[str] | None = None) -> None:
    """The random model and every export (or `only` those; listed in work/built.json)."""
    from surgery.models.builtin import byte_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    source = work / "qwen-1.5b-shape"
    if not (source / "config.json").exists():
        random_qwen(source, source, layers)
        byte_tokenizer().save_pretrained(source)
    built = {}
    for label, body in recipes(layers).items():
        if only and label not in only:
            continue
        slug = label.replace(" ", "-")
        recipe = work / f"{slug}.surg"
        recipe.write_text(f'model "{source}"\n{body}')
        out = work / slug
        seconds = run([sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force",
                       "--no-verify"], work / "build.log")  # fmt: skip
        report = json.loads((out / "surgery.json").read_text())
        built[label] = {"folder": str(out), "build_seconds": seconds,
                        "kv_bytes_per_token": report["kv_cache"]["after"]["bytes_per_token"],
                        "kv_layers": len(report["kv_cache"]["slots"])}  # fmt: skip
        print(label, built[label], flush=True)
    (work / "built.json").write_text(json.dumps(built, indent=2))


def measure(work: Path, lengths: list[int], rounds: int, steps: int, threads: int, only: list[str] | None,
            out_json: str, folders: dict | None = None, model_name: str = "random Qwen2.5-1.5B shape, fp32 export"
            ) -> None:  # fmt: skip
    """Decode ms per token of every export (or `only` those) at each cache length; `folders`
    (name -> {"folder", "kv_bytes_per_token"}) measures those outputs instead of the built ones."""
    import onnxruntime as ort

    from surgery.backend.latency import decode_after_cache
    from surgery.backend.runtime import OnnxCausalLM

    built = json.loads((work / "built.json").read_text()) if folders is None else folders
    labels = [label for label in built if not only or label in only]
    rng = np.random.default_rng(0)
    table: dict = {label: {"kv_bytes_per_token": built[label]["kv_bytes_per_token"], "decode_ms": {}}
                   for label in labels}  # fmt: skip
    times: dict[str, dict[int, list[float]]] = {label: {n: [] for n in lengths} for label in labels}
    for index in range(rounds):
        # One session open at a time (a 1.5B fp32 export is 7 GB), the order rotating each round.
        for label in labels[index % len(labels) :] + labels[: index % len(labels)]:
            model = OnnxCausalLM(built[label]["folder"], threads=threads)
            for length in lengths:
                times[label][length].append(decode_after_cache(model, length, steps, rng))
                print(f"round {index + 1}: {label} after {length}: {times[label][length][-1]:.2f} ms", flush=True)
            del model
    for label in labels:
        table[label]["decode_ms"] = {str(n): round(statistics.median(times[label][n]), 2) for n in lengths}
        table[label]["rounds"] = {str(n): [round(t, 2) for t in times[label][n]] for n in lengths}
    result = {"model": model_name, "machine": {
        "cores": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
        "onnxruntime": ort.__version__, "threads": threads},
        "protocol": {"rounds": rounds, "decode_steps": steps, "warmup_steps": 4,
                     "cache": "random, in the export's layout"}, "exports": table}  # fmt: skip
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=2))
    print(f"\n{'export':32} {'KV B/tok':>9} " + " ".join(f"{'ms@' + str(n):>9}" for n in lengths))
    for label, row in table.items():
        cells = " ".join(f"{row['decode_ms'][str(n)]:>9.2f}" for n in lengths)
        print(f"{label:32} {row['kv_bytes_per_token']:>9,} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("build", "measure"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgery-kv-cpu"))
    parser.add_argument("--layers", type=int, default=QWEN_1_5B["num_hidden_layers"], help="fewer for a quick try")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own)")
    parser.add_argument("--only", nargs="+", default=None, metavar="EXPORT")
    parser.add_argument("--folders", nargs="+", default=None, metavar="NAME=DIR",
                        help="measure these outputs (bench_kv_cache.py's --keep folders) instead of the built ones")
    parser.add_argument("--json", default=str(REPO / "bench-results" / "kv-decode-cpu.json"))
    args = parser.parse_args()
    if args.phase == "build":
        build(args.work, args.layers, args.only)
        return
    folders, name = None, "random Qwen2.5-1.5B shape, fp32 export"
    if args.folders:
        folders = {}
        for item in args.folders:
            label, folder = item.split("=", 1)
            report = json.loads((Path(folder) / "surgery.json").read_text())
            folders[label] = {"folder": folder, "kv_bytes_per_token": report["kv_cache"]["after"]["bytes_per_token"]}
        name = report["recipe"]["text"].splitlines()[0]  # the model line
    measure(args.work, args.lengths, args.rounds, args.steps, args.threads, args.only, args.json, folders, name)


if __name__ == "__main__":
    main()
