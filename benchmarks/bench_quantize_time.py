"""Benchmark: how long int4 recipes take to apply, on a random-weight model of a real shape, on the
CPU or the GPU (`--device cuda`, the calibration, sensitivity and GPTQ on the GPU).

The time of these recipes depends on the shapes, not on the weights, so a seeded random model of
Qwen2.5-1.5B's shape (28 layers, hidden 1536, intermediate 8960, 12/2 heads, vocabulary 151,936,
tied head) stands for the real one where its weights cannot travel (the GPU machine has no
network). Its tokenizer is a real one (`--tokenizer`, a folder with tokenizer.json: by default
Qwen2.5-Coder's, converted by bench_int4_quality.py), so the calibration text tokenizes as it
would.

Rows, each `surgery apply --no-verify` in a fresh process, timed, its peak memory taken, its
phases read from the report's timings:
- `rtn`: every linear, the head and the embedding at int4, rounded to nearest;
- `gptq`: the same with `gptq` on the linears and the head;
- `<bits> bpw [gptq] [act-order]`: `quantize model to <bits> bits per weight [gptq] [act-order]`
  (`--rows 4.9`, `4.9g`, `4.9ga`);
- `builder:<algo>`: onnxruntime-genai's builder, `-p int4 -e cpu --extra_options algo_config=<algo>`
  (`--rows builder:k_quant_mixed`), the peer issue 26 bounds our time by, in the same run.

    python benchmarks/bench_quantize_time.py [--device cuda] [--rows rtn gptq 4.9 4.9g 4.9ga builder:k_quant_mixed]
        [--calibration "samples 32 length 256"] [--dtype float16|float32] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import GPTQ, RTN, measure, preset, size_mb, write_result  # noqa: E402

QWEN_1_5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def random_qwen(folder: Path, tokenizer: Path, layers: int, dtype: str = "float16") -> None:
    """A seeded random model of Qwen2.5-1.5B's shape (`layers` of them) in `dtype` safetensors,
    with `tokenizer`'s files."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{**QWEN_1_5B, "num_hidden_layers": layers}, torch_dtype=dtype)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)


def _default_tokenizer() -> Path | None:
    from surgery.models.builtin import cache_dir

    found = sorted((Path(cache_dir()) / "models").glob("qwen2.5-coder-1.5b-instruct-*"))
    return found[0] if found else None


def _builder_row(model: Path, work: Path, algo: str) -> dict:
    """onnxruntime-genai's builder on `model` with `algo_config=algo`, timed in a fresh process."""
    out = work / f"builder-{algo}"
    shutil.rmtree(out, ignore_errors=True)
    print(f"building with onnxruntime-genai's builder, algo_config={algo} ...", flush=True)
    measured = measure([sys.executable, str(REPO / "benchmarks" / "genai_builder_compat.py"), "-i", str(model),
                        "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache"),
                        "--extra_options", f"algo_config={algo}"])  # fmt: skip
    row = {**measured, "mb": round(size_mb(out), 1), "timings": {}, "recipe": f"builder algo_config={algo}"}
    print(f"  {row['seconds']} s, peak {row['peak_gb']} GB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where calibration and rounding run")
    parser.add_argument("--rows", nargs="+", default=["rtn", "gptq", "4.9", "4.9g"],
                        help="rtn, gptq, or bits per weight (g adds gptq, ga gptq act-order)")  # fmt: skip
    parser.add_argument("--calibration", default="samples 32 length 256", help="the calibrate statement's options")
    parser.add_argument("--layers", type=int, default=28, help="fewer layers for a quick try (28: the real shape)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                        help="the random model's weights (float32: as the GGUF-dequantized real one)")  # fmt: skip
    parser.add_argument("--tokenizer", type=Path, default=None, help="a folder with tokenizer.json")
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary folder, removed after")
    parser.add_argument("--json", default=None, help="default: bench-results/quantize-time-<device>.json")
    args = parser.parse_args()
    tokenizer = args.tokenizer or _default_tokenizer()
    if tokenizer is None or not (tokenizer / "tokenizer.json").exists():
        raise SystemExit("no tokenizer: pass --tokenizer DIR (a folder with tokenizer.json)")
    work = args.work or Path(tempfile.mkdtemp(prefix="surgery-quantize-time-"))
    model = work / f"random-qwen2.5-1.5b-{args.layers}-layers-{args.dtype}"
    if not (model / "config.json").exists():
        print(f"writing a random model of Qwen2.5-1.5B's shape to {model} ...", flush=True)
        random_qwen(model, tokenizer, args.layers, args.dtype)
    head = f'model "{model}"\ncalibrate on "wikitext-2-valid" {args.calibration}\n'
    rows = {}
    for row in args.rows:
        if row.startswith("builder:"):
            rows[row] = _builder_row(model, work, row.split(":", 1)[1])
            continue
        if row in ("rtn", "gptq"):
            recipe = f'model "{model}"\n' + RTN if row == "rtn" else head + GPTQ
        else:
            row, statement = preset(row)
            recipe = head + statement
        path, out = work / f"{row.replace(' ', '-')}.surg", work / row.replace(" ", "-")
        path.write_text(recipe)
        shutil.rmtree(out, ignore_errors=True)
        print(f"applying {row} on {args.device} ...", flush=True)
        measured = measure([sys.executable, "-m", "surgery", "apply", str(path), "-o", str(out), "--no-verify",
                            "--device", args.device])  # fmt: skip
        report = json.loads((out / "surgery.json").read_text())
        timings = {k: round(v, 1) for k, v in report.get("timings_s", {}).items()}
        rows[row] = {**measured, "mb": round(size_mb(out), 1), "timings": timings, "recipe": recipe}
        print(f"  {rows[row]['seconds']} s, peak {rows[row]['peak_gb']} GB, {timings}", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    device_name = args.device
    if args.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(0)
    print(f"\nrandom Qwen2.5-1.5B-shaped model ({args.layers} layers), {os.cpu_count()} cores, device {device_name}\n")
    print(f"{'recipe':22} {'seconds':>8} {'peak GB':>8} {'MB':>8}  phases (s)")
    for name, row in rows.items():
        phases = ", ".join(f"{k} {v}" for k, v in row["timings"].items() if k != "total")
        print(f"{name:22} {row['seconds']:8.1f} {row['peak_gb']:8.2f} {row['mb']:8.1f}  {phases}")
    write_result(
        args.json or str(REPO / "bench-results" / f"quantize-time-{args.device.split(':')[0]}.json"),
        {
            "model": f"random Qwen2.5-1.5B shape (seeded), {args.layers} layers, {args.dtype} safetensors",
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "device": device_name},
            "calibration": args.calibration,
            "rows": rows,
            "date": time.strftime("%Y-%m-%d"),
        },
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
