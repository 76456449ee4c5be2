"""GPU benchmark (an NVIDIA GPU with onnxruntime-gpu and onnxruntime-genai-cuda): our fp16 and int4
CUDA exports against onnxruntime-genai's builder's, decode through onnxruntime-genai-cuda.

Two phases, so each fits a short machine lease (see ../shared/docs/gpu.md for the setup):

    python benchmarks/bench_gpu.py build   --work /tmp/gw [--smollm2 FILE.gguf] [--gemma FILE.gguf]
    python benchmarks/bench_gpu.py measure --work /tmp/gw --json bench-results/gpu.json [--rounds 8] [--only NAME]

`build` writes a random-weight model of Llama-3.2-1B's shape (16 layers, hidden 2048, 32/8
heads, intermediate 8192, vocabulary 128256, tied head; fp16 safetensors, generated here), then
for it (and for SmolLM2-135M when its GGUF is given):
- the builder's `-p fp16 -e cuda` and `-p int4 -e cuda` models;
- `surgery apply --provider cuda` of `export onnx for cuda` (fp16), of the same with attention
  dropped in 4 of 16 layers (3, 7, 11, 15), and of `quantize layers|head|embedding to int4
  symmetric` for cuda; the fp16 ones verified on the CUDA provider against PyTorch in fp16, with
  KL divergence and top-1 agreement against fp32 (recorded from each surgery.json).
Every timed model is also measured with CUDA graphs on and off (`enable_cuda_graph` in the cuda
provider options of its genai_config.json, through a view of its folder): our CUDA outputs write
it on, the builder's off, so each appears as its default and as the other; the greedy tokens of
the two must be equal. With `--smollm2`, `surgery fp16 draft int4` is SmolLM2 for cuda with a
draft of int4 layers, head and embedding (`draft { ... }`): its surgery.json has the draft's
predicted and measured acceptance and its speed-up in genai; `measure` times it whole (the
decode figure of a draft row is the mean over the steps: genai emits drafted tokens in bursts).
With `--gemma FILE.gguf`, Gemma 3 270M's fp16 and bf16 CUDA exports are built and verified the
same way (verification only: the builder is not run for it, and it is not timed); SmolLM2 also
gets a bf16 export, verified and not timed.
`measure` times every timed model through onnxruntime-genai-cuda: after an untimed warm-up
generation, the prefill of a random prompt of 256 or 2048 tokens (ms), then 64 greedy decode
steps, each timed alone (the decode figure of a run is the median step, so one stalled step does
not move it). Rounds open the models afresh in a rotated order; the "vs" figures are medians of
per-round ratios: every model against the builder model of its width, and the drop-attention
export also against our unmodified export.
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


def hf_folder_of(name: str, source: Path, work: Path) -> Path:
    """The Hugging Face folder the builder reads: a GGUF is converted once, as surgery does."""
    if source.suffix != ".gguf":
        return source
    folder = work / f"{name}-hf"
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(REPO))
        import torch

        from surgery.models.loading import load_model
        from surgery.models.specs import resolve_spec

        model, tokenizer, _ = load_model(resolve_spec(str(source)), lambda message: None)
        model.to(dtype=torch.float16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def recipes_for(name: str) -> dict[str, str]:
    """Our exports of one model: label -> recipe body (after its `model` line)."""
    int4 = "quantize layers to int4 symmetric\nquantize head to int4 symmetric\n"
    int4 += "quantize embedding to int4 symmetric\nexport onnx for cuda\n"
    recipes = {
        "surgery fp16": "export onnx for cuda\n",
        "surgery fp16 drop attention 4": f"drop attention layers {LAYERS_DROPPED}\nexport onnx for cuda\n",
        "surgery int4": int4,
        "surgery bf16": "export onnx precision bf16 for cuda\n",
    }
    if name.startswith("smollm2"):
        draft = "draft {\n    quantize layers to int4\n    quantize head to int4\n    quantize embedding to int4\n}\n"
        recipes["surgery fp16 draft int4"] = draft + "export onnx for cuda\n"
    if name != "llama-1b-shape":
        recipes.pop("surgery fp16 drop attention 4")
    if name == "llama-1b-shape":
        recipes.pop("surgery bf16")
    if name.startswith("gemma"):
        recipes.pop("surgery int4")
    return recipes


def build(work: Path, smollm2: str | None, gemma: str | None = None, llama: bool = True) -> None:
    """Build the builder's models and ours (listed in work/built.json, phases may run apart)."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    sources = {}
    if llama:
        sources["llama-1b-shape"] = work / "llama-1b"
        if not (work / "llama-1b" / "config.json").exists():
            random_llama(work / "llama-1b")
    if smollm2:
        sources["smollm2-135m"] = Path(smollm2)
    if gemma:
        sources["gemma3-270m"] = Path(gemma)
    built: dict = json.loads((work / "built.json").read_text()) if (work / "built.json").exists() else {}
    for name, source in sources.items():
        rows = built[name] = {}
        if not name.startswith("gemma"):  # Gemma 3 is verified only: no builder models, not timed
            hf_folder = hf_folder_of(name, source, work)
            for precision in ("fp16", "int4"):
                out = work / f"{name}-builder-{precision}"
                seconds = run(
                    [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
                     "-p", precision, "-e", "cuda", "-c", str(work / "builder-cache")],
                    log,
                )  # fmt: skip
                rows[f"builder {precision}"] = {"folder": str(out), "seconds": seconds, "timed": True}
        for label, body in recipes_for(name).items():
            slug = label.replace(" ", "-")
            recipe = work / f"{name}-{slug}.surg"
            recipe.write_text(f'model "{source}"\n{body}')
            out = work / f"{name}-{slug}"
            command = [sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force"]
            seconds = run([*command, "--provider", "cuda"], log)
            report = json.loads((out / "surgery.json").read_text())
            rows[label] = {
                "folder": str(out),
                "seconds": seconds,
                "timed": not name.startswith("gemma") and "bf16" not in label,
                "verification": report["verification"],
                "quantization_moved": (report.get("quantization") or {}).get("against_pytorch_fp32"),
                "draft": report.get("draft"),
                "mb": round(sum(f.stat().st_size for f in out.glob("model.onnx*")) / 1e6, 1),
            }
            verification = rows[label]["verification"]
            print(f"{name} {label}: max diff {verification.get('max_abs_logit_diff')}, "
                  f"KL {verification.get('fp32_kl')}, top-1 {verification.get('fp32_top1')}", flush=True)  # fmt: skip
            (work / "built.json").write_text(json.dumps(built, indent=2))
        for label in [label for label, row in rows.items() if row.get("timed") and "draft" not in label]:
            graphs = "no graphs" if label.startswith("surgery") else "graphs"
            rows[f"{label} {graphs}"] = {"folder": str(graph_view(Path(rows[label]["folder"]), graphs == "graphs")),
                                         "timed": True, "variant_of": label}  # fmt: skip
    (work / "built.json").write_text(json.dumps(built, indent=2))


def graph_view(folder: Path, graphs: bool) -> Path:
    """A view of an output folder (links to its files) whose genai_config.json turns CUDA graphs on or off."""
    sys.path.insert(0, str(REPO))
    from surgery.backend.speculative import config_view

    def switch(config: dict) -> None:
        for provider in config["model"]["decoder"]["session_options"]["provider_options"]:
            if "cuda" in provider:
                provider["cuda"].pop("enable_cuda_graph", None)
                if graphs:
                    provider["cuda"]["enable_cuda_graph"] = "1"

    return config_view(folder, folder.parent / f"{folder.name}-{'graphs' if graphs else 'no-graphs'}", switch)


def genai_timing(folder: str, prompt: np.ndarray, steps: int, mean: bool = False) -> tuple[float, float, list[int]]:
    """(prefill ms, decode ms per token, the greedy tokens) of one freshly opened model through
    onnxruntime-genai (`mean`: the decode figure is the mean step, for a model with a draft).

    An untimed 16-token generation first pays onnxruntime's first-run costs (kernel selection,
    allocations), so the prefill figure is the prompt's. Each decode step is timed alone and the
    median step is returned: a launch-bound GPU at 1 to 2 ms per token stalls now and then, and
    a mean would charge those stalls to whichever model they hit.
    """
    import onnxruntime_genai as og

    model = og.Model(folder)

    def generator_for(loaded, length: int):
        params = og.GeneratorParams(loaded)
        params.set_search_options(max_length=length, do_sample=False)
        return og.Generator(loaded, params)

    warm = generator_for(model, len(prompt) + steps + 8)
    warm.append_tokens(prompt[:16].astype(np.int32)[None])
    for _ in range(4):
        warm.generate_next_token()
    np.asarray(warm.get_next_tokens())
    del warm
    generator = generator_for(model, len(prompt) + steps + 8)
    started = time.perf_counter()
    generator.append_tokens(prompt.astype(np.int32)[None])
    np.asarray(generator.get_next_tokens())  # prefill done (the next token read back)
    prefill = (time.perf_counter() - started) * 1000
    step_ms = []
    tokens = []
    for _ in range(steps):
        started = time.perf_counter()
        generator.generate_next_token()
        tokens.append(int(np.asarray(generator.get_next_tokens())[0]))  # synchronises: the token is on the host
        step_ms.append((time.perf_counter() - started) * 1000)
    del generator, model
    return prefill, (statistics.mean if mean else statistics.median)(step_ms), tokens


def baselines_of(label: str) -> list[str]:
    """The models a row is compared with: the builder's of its width, and for a dropped export our unmodified one."""
    compared = ["builder int4" if "int4" in label and "draft" not in label else "builder fp16"]
    if "drop" in label or "draft" in label:
        compared.append("surgery fp16")
    return compared


def measure(
    work: Path, out_json: str, rounds: int, steps: int, only: list[str] | None = None, lengths=(256, 2048), vocab=None
) -> None:
    """Time every timed model of work/built.json; results are merged into `out_json`."""
    built = json.loads((work / "built.json").read_text())
    existing = Path(out_json)
    result: dict = json.loads(existing.read_text()) if existing.exists() else {}
    result["protocol"] = {"rounds": rounds, "decode_steps": steps, "batch": 1, "decode_figure": "median step"}
    result.setdefault("models", {})
    rng = np.random.default_rng(0)
    for name, rows in built.items():
        if only and name not in only:
            continue
        size = vocab or (49152 if name.startswith("smollm2") else LLAMA_1B["vocab_size"])
        result["models"][name] = table = {}
        timed = [label for label, row in rows.items() if row.get("timed", True)]
        for length in lengths:
            prompt = rng.integers(size // 100, size - size // 100, length)
            times = {label: {"prefill": [], "decode": []} for label in timed}
            tokens = {}
            for index in range(rounds):
                order = timed[index % len(timed) :] + timed[: index % len(timed)]
                for label in order:
                    prefill, decode, tokens[label] = genai_timing(rows[label]["folder"], prompt, steps,
                                                                  mean="draft" in label)  # fmt: skip
                    times[label]["prefill"].append(prefill)
                    times[label]["decode"].append(decode)
            for label in timed:
                row = table.setdefault(label, {})[f"prompt_{length}"] = {
                    "decode_ms": round(statistics.median(times[label]["decode"]), 3),
                    "decode_best_ms": round(min(times[label]["decode"]), 3),
                    "prefill_ms": round(statistics.median(times[label]["prefill"]), 2),
                    "rounds_decode_ms": [round(v, 3) for v in times[label]["decode"]],
                    "rounds_prefill_ms": [round(v, 2) for v in times[label]["prefill"]],
                }
                twin = rows[label].get("variant_of") or ("surgery fp16" if "draft" in label else None)
                if twin in tokens:
                    row[f"tokens_equal_to_{twin.replace(' ', '_')}"] = tokens[label] == tokens[twin]
                for baseline in baselines_of(label):
                    for kind in ("decode", "prefill"):
                        ratios = [a / b for a, b in zip(times[label][kind], times[baseline][kind], strict=True)]
                        row[f"{kind}_vs_{baseline.replace(' ', '_')}"] = round(statistics.median(ratios), 3)
                        row[f"{kind}_vs_{baseline.replace(' ', '_')}_rounds_below_1"] = sum(r < 1 for r in ratios)
                print(name, length, label, {k: v for k, v in row.items() if not k.startswith("rounds")}, flush=True)
        for label, row in rows.items():
            table.setdefault(label, {})["export"] = {k: v for k, v in row.items() if k != "folder"}
    try:
        import onnxruntime as ort

        result["machine"] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("build", "measure"))
    parser.add_argument("--work", default="/tmp/surgery-gpu")
    parser.add_argument("--smollm2", help="SmolLM2-135M's GGUF file, to benchmark it too")
    parser.add_argument("--gemma", help="Gemma 3 270M's GGUF file, to build and verify its fp16 and bf16 exports")
    parser.add_argument("--no-llama", action="store_true", help="do not build the Llama-shaped models")
    parser.add_argument("--only", nargs="*", help="measure only these models (llama-1b-shape, smollm2-135m)")
    parser.add_argument("--json", default=str(REPO / "bench-results" / "gpu.json"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 2048], help="prompt lengths")
    parser.add_argument("--vocab", type=int, help="draw prompt tokens below this id (default: the model's vocabulary)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    if args.phase == "build":
        build(Path(args.work), args.smollm2, args.gemma, llama=not args.no_llama)
    else:
        measure(Path(args.work), args.json, args.rounds, args.steps, args.only, args.lengths, args.vocab)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
