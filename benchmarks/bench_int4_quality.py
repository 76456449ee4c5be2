"""Benchmark: int4 quality, ours against onnxruntime-genai's builder, on one model in one run.

Rows (each built in a fresh process, timed, its peak memory taken):
- `fp32`: our fp32 export, the reference every KL and top-1 is measured against;
- `builder int4` and `builder int4 <algo>`: `python -m onnxruntime_genai.models.builder -p int4
  -e cpu` (through genai_builder_compat.py, which lets it read Gemma 3's config), once per
  `--builder-algos` value as its `algo_config` (`default`: round to nearest;
  `k_quant_mixed`: llama.cpp's mixed strategy, int8 for the head and the most sensitive linears);
  a value may add the builder's other options after `+` (`k_quant_mixed+is_symmetric=false`,
  `default+block_size=16`);
- `ours rtn`: every linear, the head and the embedding at int4 (block 32, zero points), rounded
  to nearest (onnxruntime's own packer);
- `ours gptq`: the same with `gptq` on the linears and the head (the recipe before issue 26);
- `ours <bits> bpw`: `quantize model to <bits> bits per weight` for each `--budgets` value
  (weighted grids, per-tensor formats by measured sensitivity); a value ending in `g` (`6.55g`)
  adds `gptq`, in `ga` `gptq act-order`;
- `--gguf-rows NAME=FILE`: a quantized GGUF of the same model (llama.cpp's Q4_K_M from
  benchmarks/llamacpp_quantize.py), scored here as our fp32 export of its dequantized weights, so
  its quality is measured by the same protocol; its size and bits are the GGUF file's, its
  build columns are our conversion and export's (llamacpp_quantize.py times llama-quantize), its
  decode time is not measured (that would be llama.cpp's runtime, not onnxruntime's).

Columns: file MB; bits per weight of the quantized tensors and of the whole model
(surgery.analysis.quantization.bits_summary, read from each model.onnx); perplexity on the first
`--tokens` tokens of WikiText-2 test (windows of 512, onnxruntime); mean KL and top-1
agreement against the fp32 export on the same windows; decode ms per token after a 256-token
prompt (rounds that open the models afresh in a rotated order); build seconds and peak GB.

    python benchmarks/bench_int4_quality.py smollm2|gemma3|qwen [--tokens 16384] [--rounds 3]
        [--budgets 4.8 6.55g] [--builder-algos default k_quant_mixed] [--only TEXT ...]
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
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import GPTQ, RTN, GenaiModel, measure, paired_latency, preset, size_mb, write_result  # noqa: E402

MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


def builder_options(algo: str) -> list[str]:
    """The builder's `--extra_options` for a `--builder-algos` value: `k_quant+block_size=64` ->
    algo_config=k_quant block_size=64."""
    base, *more = algo.split("+")
    return [f"algo_config={base}", *more]


def _gguf_bits(path: Path) -> dict:
    """Bits per weight of a GGUF file: of its quantized tensors (their blocks' bytes over their
    weights) and of the whole file (its bytes over every tensor's values)."""
    from gguf import GGUFReader
    from gguf.constants import GGMLQuantizationType as Q

    reader = GGUFReader(str(path))
    floats = {Q.F32, Q.F16, Q.BF16}
    quantized = [t for t in reader.tensors if t.tensor_type not in floats]
    values = sum(int(t.n_elements) for t in reader.tensors)
    q_values = sum(int(t.n_elements) for t in quantized)
    return {"quantized_bits": round(8 * sum(int(t.n_bytes) for t in quantized) / q_values, 3) if q_values else None,
            "model_bits": round(8 * path.stat().st_size / values, 3)}  # fmt: skip


def _model(args) -> tuple[str, Path]:
    """(model spec for surgery, Hugging Face folder for the builder)."""
    if args.model == "qwen":
        from bench_scale import qwen_gguf, surgery_folder

        work = Path("/tmp/surgery-scale")
        gguf = str(qwen_gguf(work))
        from surgery.models.builtin import cache_dir

        return gguf, surgery_folder(gguf, cache_dir())
    from surgery.models import builtin

    return MODELS[args.model], builtin.packaged_folder(MODELS[args.model])


def _bits(folder: Path) -> dict:
    import onnx

    from surgery.analysis.quantization import bits_summary

    summary = bits_summary(onnx.load(str(folder / "model.onnx"), load_external_data=False))
    if not summary.get("quantized_parameters"):
        return {"quantized_bits": None, "model_bits": 32.0}
    quantized = summary["quantized_parameters"]
    stored = summary["quantized_linears_storage_bits"] * quantized
    embedding = summary.get("embedding")
    if embedding and not embedding["shared_with_head"]:
        stored += 8 * embedding["storage_bytes"]
        quantized += embedding["parameters"]
    return {"quantized_bits": round(stored / quantized, 3), "model_bits": round(summary["model_storage_bits"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("smollm2", "gemma3", "qwen"))
    parser.add_argument("--json", default=None, help="default: bench-results/int4-quality-<model>.json")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--budgets", nargs="+", default=["4.8", "6.55g"],
                        help="bits per weight of `quantize model`; g adds gptq, ga gptq act-order")  # fmt: skip
    parser.add_argument("--calibration", default="samples 64 length 256", help="the calibrate statement's options")
    parser.add_argument("--builder-algos", nargs="+", default=["default", "k_quant_mixed"], metavar="ALGO")
    parser.add_argument("--gguf-rows", nargs="+", default=[], metavar="NAME=FILE",
                        help="quantized GGUFs of the same model, scored as exports of their weights")  # fmt: skip
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT", help="only rows whose name has one of these")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the outputs here and keep them; a row already built there is reused")  # fmt: skip
    parser.add_argument("--build-only", action="store_true", help="build the rows (into --keep) and stop")
    args = parser.parse_args()
    started = time.perf_counter()
    spec, hf_folder = _model(args)
    work = args.keep or Path(tempfile.mkdtemp(prefix="surgery-int4-quality-"))
    work.mkdir(parents=True, exist_ok=True)

    head = f'model "{spec}"\ncalibrate on "wikitext-2-valid" {args.calibration}\n'
    recipes = {"fp32": f'model "{spec}"\nexport onnx\n', "ours rtn": f'model "{spec}"\n' + RTN}
    recipes["ours gptq"] = head + GPTQ
    for budget in args.budgets:
        name, statement = preset(budget)
        recipes[f"ours {name}"] = head + statement
    builders = {("builder int4" if a == "default" else f"builder int4 {a}"): a for a in args.builder_algos}
    ggufs = {name: Path(file).resolve() for name, file in (row.split("=", 1) for row in args.gguf_rows)}
    for name, file in ggufs.items():
        recipes[name] = f'model "{file}"\nexport onnx\n'
    names = [n for n in [*recipes, *builders] if n == "fp32" or not args.only or any(o in n for o in args.only)]
    folders: dict[str, Path] = {}
    builds: dict[str, dict] = {}
    for name in names:
        out = work / name.replace(" ", "-")
        record = work / f"{name.replace(' ', '-')}.build.json"
        if args.keep and record.exists() and (out / "model.onnx").exists():
            builds[name], folders[name] = json.loads(record.read_text()), out  # built by an earlier run
            print(f"reusing {name}: {builds[name]}", flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        if name in recipes:
            recipe = work / f"{name.replace(' ', '-')}.surg"
            recipe.write_text(recipes[name])
            command = [sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--no-verify"]
        else:
            command = [sys.executable, str(REPO / "benchmarks" / "genai_builder_compat.py"), "-i", str(hf_folder),
                       "-o", str(out),
                       "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache"),
                       "--extra_options", *builder_options(builders[name])]  # fmt: skip
        print(f"building {name} ...", flush=True)
        builds[name] = measure(command)
        folders[name] = out
        record.write_text(json.dumps(builds[name]))
        print(f"  {builds[name]}", flush=True)
    if args.build_only:
        return

    from transformers import AutoTokenizer

    from surgery.backend.evaluate import compare, eval_tokens, onnx_logits
    from surgery.backend.runtime import OnnxCausalLM
    from surgery.data import resolve_text

    tokenizer = AutoTokenizer.from_pretrained(str(folders["fp32"]))
    tokens = eval_tokens(tokenizer, resolve_text("wikitext-2-test"), args.tokens)
    # The fp32 logits of every window, computed once (the fp32 row) and kept on disk: a
    # 151,936-token vocabulary makes them 10 GB for 16k tokens, more than this machine holds
    # beside two models.
    reference = [onnx_logits(str(folders["fp32"]), args.threads)]
    cache = Path(tempfile.mkdtemp(prefix="reference-logits-", dir=work))

    def cached_reference(ids: np.ndarray) -> np.ndarray:
        path = cache / f"{'-'.join(map(str, ids.ravel()[:8]))}-{ids.size}.npy"
        if not path.exists():
            np.save(path, reference[0](ids))
        return np.load(path, mmap_mode="r")

    # The builder's Gemma 3 keeps its sliding-window layers' KV cache in fixed buffers that
    # onnxruntime-genai allocates: it runs there (bench_gemma3.py does the same), the rest in
    # onnxruntime.
    genai = {name for name in folders if name.startswith("builder") and args.model == "gemma3"}
    rows: dict[str, dict] = {}
    for name, folder in folders.items():
        threads = args.threads
        if name == "fp32":  # itself: its windows' logits, cached for the rest
            logits = cached_reference
        else:
            logits = GenaiModel(str(folder), threads).logits if name in genai else onnx_logits(str(folder), threads)
        result = compare(logits, cached_reference, tokens)
        reference.clear()  # every window is cached now: the fp32 session goes
        rows[name] = {
            "mb": round(ggufs[name].stat().st_size / 1e6 if name in ggufs else size_mb(folder), 1),
            **(_gguf_bits(ggufs[name]) if name in ggufs else _bits(folder)),
            "perplexity": round(result.candidate.perplexity, 3),
            "mean_kl": round(result.mean_kl, 5),
            "top1": round(result.top1_agreement, 4),
            **{f"build_{k}": v for k, v in builds[name].items()},
        }
        print(f"{name}: {rows[name]}", flush=True)

    text = (REPO / "benchmarks" / "prompt.txt").read_text()
    prompt = np.array(tokenizer(text)["input_ids"][:256], dtype=np.int64)
    loaders = {name: partial(GenaiModel if name in genai else OnnxCausalLM, str(folder), threads=args.threads)
               for name, folder in folders.items() if name not in ggufs}  # fmt: skip
    baseline = "builder int4" if "builder int4" in loaders else "fp32"
    latency, rounds = paired_latency(loaders, prompt, args.steps, args.rounds, baseline)

    fp32 = rows["fp32"]["perplexity"]
    print(f"\n{spec}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; WikiText-2 test, "
          f"{tokens.scored()} scored tokens, windows of {tokens.window}\n")  # fmt: skip
    print(f"{'model':26} {'MB':>7} {'bits q':>7} {'bits m':>7} {'ppl':>8} {'vs fp32':>8} {'KL':>8} {'top-1':>6} "
          f"{'ms/tok':>7} {'build s':>8} {'peak GB':>8}")  # fmt: skip
    for name, row in rows.items():
        q = f"{row['quantized_bits']:.3f}" if row["quantized_bits"] else "-"
        ms = f"{latency[name]['median_ms']:.2f}" if name in latency else "-"  # a GGUF row: not onnxruntime's
        print(f"{name:26} {row['mb']:7.1f} {q:>7} {row['model_bits']:7.3f} {row['perplexity']:8.3f} "
              f"{row['perplexity'] / fp32 - 1:+8.2%} {row['mean_kl']:8.4f} {row['top1']:6.3f} "
              f"{ms:>7} {row['build_seconds']:8.1f} {row['build_peak_gb']:8.2f}")  # fmt: skip
    write_result(
        args.json or str(REPO / "bench-results" / f"int4-quality-{args.model}.json"),
        {
            "model": spec,
            "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
            "protocol": {"tokens": tokens.scored(), "window": tokens.window, "prompt_tokens": 256,
                         "decode_steps": args.steps, "rounds": args.rounds, "threads": args.threads,
                         "calibration": args.calibration},  # fmt: skip
            "recipes": {name: recipes[name] for name in folders if name in recipes},
            "builder_algos": {name: builders[name] for name in folders if name in builders},
            "gguf_rows": {name: str(ggufs[name]) for name in folders if name in ggufs},
            "models": rows,
            "decode_ms_per_token": latency,
            "decode_rounds": rounds,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    shutil.rmtree(cache, ignore_errors=True)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
