"""GPU benchmark (an NVIDIA GPU with onnxruntime-gpu and onnxruntime-genai-cuda): our fp16 and int4
CUDA exports against onnxruntime-genai's builder's, decode through onnxruntime-genai-cuda.

Two phases, so each fits a short machine lease (see ../shared/docs/gpu.md for the setup):

    python benchmarks/bench_gpu.py build   --work /tmp/gw [--smollm2 FILE.gguf]
    python benchmarks/bench_gpu.py measure --work /tmp/gw --json bench-results/gpu.json [--rounds 5]

`build` writes a random-weight model of Llama-3.2-1B's shape (16 layers, hidden 2048, 32/8
heads, intermediate 8192, vocabulary 128256, tied head; fp16 safetensors, generated here), then
for it (and for SmolLM2-135M when its GGUF is given):
- the builder's `-p fp16 -e cuda` and `-p int4 -e cuda` models;
- `surgery apply --provider cuda` of `export onnx for cuda` (fp16), of the same with attention
  dropped in 4 of 16 layers (3, 7, 11, 15), and of `quantize layers|head|embedding to int4
  symmetric` for cuda; the fp16 ones verified on the CUDA provider against PyTorch in fp16, with
  KL divergence and top-1 agreement against fp32 (recorded from each surgery.json).
`measure` times every model through onnxruntime-genai-cuda: decode ms per token after prompts of
256 and 2048 tokens (48 steps, 4 untimed), and prefill ms of the prompt, in rounds that open the
models afresh in a rotated order; "vs" columns are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LAYERS_DROPPED = "3, 7, 11, 15"
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def random_llama(folder: Path) -> None:
    """A seeded random model of Llama-3.2-1B's shape in fp16 safetensors, with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B, torch_dtype="float16")
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder)
    # The benchmark feeds token ids; a tokenizer is still part of a model folder.
    vocab = {f"t{i}": i for i in range(LLAMA_1B["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = f"t{LLAMA_1B['bos_token_id']}", f"t{LLAMA_1B['eos_token_id']}"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)
    fast.save_pretrained(folder)


def run(command: list[str], log: Path) -> float:
    """Run a command, its output appended to `log`; returns wall seconds (raises on failure)."""
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    return round(time.perf_counter() - started, 1)


def build(work: Path, smollm2: str | None, llama: bool = True) -> None:
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    sources = {}
    if llama:
        sources["llama-1b-shape"] = work / "llama-1b"
        if not (work / "llama-1b" / "config.json").exists():
            random_llama(work / "llama-1b")
    if smollm2:
        sources["smollm2-135m"] = Path(smollm2)
    # Phases may run in separate calls: models built earlier stay listed.
    built: dict = json.loads((work / "built.json").read_text()) if (work / "built.json").exists() else {}
    for name, source in sources.items():
        spec = str(source)
        hf_folder = source
        if source.suffix == ".gguf":
            # The builder reads a Hugging Face folder: convert the GGUF once, as surgery does.
            sys.path.insert(0, str(REPO))
            from surgery.models.loading import load_model, resolve_spec

            model, tokenizer = load_model(resolve_spec(spec), lambda message: None)
            hf_folder = work / f"{name}-hf"
            model.to(dtype=__import__("torch").float16).save_pretrained(hf_folder)
            tokenizer.save_pretrained(hf_folder)
        rows = built[name] = {}
        for precision in ("fp16", "int4"):
            out = work / f"{name}-builder-{precision}"
            seconds = run(
                [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
                 "-p", precision, "-e", "cuda", "-c", str(work / "builder-cache")],
                log,
            )  # fmt: skip
            rows[f"builder {precision}"] = {"folder": str(out), "seconds": seconds}
        recipes = {
            "surgery fp16": "export onnx for cuda\n",
            "surgery fp16 drop attention 4": f"drop attention layers {LAYERS_DROPPED}\nexport onnx for cuda\n",
            "surgery int4": "quantize layers to int4 symmetric\nquantize head to int4 symmetric\n"
            "quantize embedding to int4 symmetric\nexport onnx for cuda\n",
        }
        if name != "llama-1b-shape":
            recipes.pop("surgery fp16 drop attention 4")
        for label, body in recipes.items():
            slug = label.replace(" ", "-")
            recipe = work / f"{name}-{slug}.surg"
            recipe.write_text(f'model "{spec}"\n{body}')
            out = work / f"{name}-{slug}"
            command = [sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force"]
            seconds = run([*command, "--provider", "cuda"], log)
            report = json.loads((out / "surgery.json").read_text())
            rows[label] = {
                "folder": str(out),
                "seconds": seconds,
                "verification": report["verification"],
                "quantization_moved": (report.get("quantization") or {}).get("against_pytorch_fp32"),
                "mb": round(sum(f.stat().st_size for f in out.glob("model.onnx*")) / 1e6, 1),
            }
            print(f"{name} {label}: {rows[label]['verification'].get('max_abs_logit_diff')}", flush=True)
            (work / "built.json").write_text(json.dumps(built, indent=2))
    (work / "built.json").write_text(json.dumps(built, indent=2))
    print(json.dumps(built, indent=2))


def genai_timing(folder: str, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """(prefill ms, decode ms per token) through onnxruntime-genai."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps + 8, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(prompt.astype(np.int32)[None])
    np.asarray(generator.get_next_tokens())  # prefill done (logits read back)
    prefill = (time.perf_counter() - started) * 1000
    warmup = 4
    for i in range(warmup + steps):
        if i == warmup:
            started = time.perf_counter()
        generator.generate_next_token()
    np.asarray(generator.get_next_tokens())
    decode = (time.perf_counter() - started) / steps * 1000
    del generator, params, model
    return prefill, decode


def measure(work: Path, out_json: str, rounds: int, steps: int) -> None:
    built = json.loads((work / "built.json").read_text())
    rng = np.random.default_rng(0)
    result: dict = {"protocol": {"rounds": rounds, "decode_steps": steps, "batch": 1}, "models": {}}
    for name, rows in built.items():
        vocab = 49152 if name.startswith("smollm2") else LLAMA_1B["vocab_size"]
        result["models"][name] = table = {}
        for length in (256, 2048):
            prompt = rng.integers(100, vocab - 100, length)
            names = list(rows)
            times = {label: {"prefill": [], "decode": []} for label in names}
            for index in range(rounds):
                order = names[index % len(names) :] + names[: index % len(names)]
                for label in order:
                    prefill, decode = genai_timing(rows[label]["folder"], prompt, steps)
                    times[label]["prefill"].append(prefill)
                    times[label]["decode"].append(decode)
            for label in names:
                baseline = "builder int4" if "int4" in label else "builder fp16"
                ratios = [a / b for a, b in zip(times[label]["decode"], times[baseline]["decode"], strict=True)]
                table.setdefault(label, {})[f"prompt_{length}"] = {
                    "decode_ms": round(statistics.median(times[label]["decode"]), 3),
                    "decode_best_ms": round(min(times[label]["decode"]), 3),
                    "prefill_ms": round(statistics.median(times[label]["prefill"]), 2),
                    f"decode_vs_{baseline.replace(' ', '_')}": round(statistics.median(ratios), 3),
                    "rounds_decode_ms": [round(v, 3) for v in times[label]["decode"]],
                }
                print(name, length, label, table[label][f"prompt_{length}"], flush=True)
        for label, row in rows.items():
            table[label]["export"] = {k: v for k, v in row.items() if k != "folder"}
    try:
        import onnxruntime as ort

        result["machine"] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=2))
    print(f"wrote {out_json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("build", "measure"))
    parser.add_argument("--work", default="/tmp/surgery-gpu")
    parser.add_argument("--smollm2", help="SmolLM2-135M's GGUF file, to benchmark it too")
    parser.add_argument("--no-llama", action="store_true", help="build only the SmolLM2 models")
    parser.add_argument("--json", default=str(REPO / "bench-results" / "gpu.json"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    if args.phase == "build":
        build(Path(args.work), args.smollm2, llama=not args.no_llama)
    else:
        measure(Path(args.work), args.json, args.rounds, args.steps)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
