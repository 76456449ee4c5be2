"""Benchmark: LFM2 at LFM2-350M's shape, ours against onnxruntime-genai's builder, in one run.

No LFM2 weights install from the package index, and the time and the state handling depend on
the shapes, not the weights, so a seeded random model of LFM2-350M's shape stands for it (16
layers, attention in 2, 5, 8, 10, 12 and 14, short convolutions of width 3 in the others, hidden
1024, MLP 4608, 16/8 heads, vocabulary 65,536, tied head; the byte-level tokenizer of the tiny
models, whose ids it shares).

Measured:
1. `surgery apply` of `export onnx` (fp32, verified against PyTorch) and the builder's
   `-p fp32 -e cpu` export of the same folder: wall time and peak RSS;
2. greedy tokens, 24 per prompt: the Hugging Face model in PyTorch, our export through
   onnxruntime (surgery.backend.runtime) and through onnxruntime-genai, the builder's through
   onnxruntime-genai;
3. decode latency, ms per token after a 256-token prompt, batch 1, in rounds that alternate the
   models (benchmarks/common.py).

    python benchmarks/bench_lfm2.py [--rounds 8] [--threads 2] [--json bench-results/lfm2.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import GenaiModel, measure, paired_latency, write_result  # noqa: E402

from surgery.backend.runtime import OnnxCausalLM  # noqa: E402

LFM2_350M = {
    "hidden_size": 1024,
    "intermediate_size": 6656,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "layer_types": ["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)],
    "conv_L_cache": 3,
    "vocab_size": 65536,
    "max_position_embeddings": 128000,
    "norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}
PROMPTS = ("The history of the city begins", "def fibonacci(n):")


def random_lfm2(folder: Path) -> None:
    """A seeded random model of LFM2-350M's shape, fp32 safetensors, with the byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Lfm2Config

    from surgery.models.tiny import byte_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Lfm2Config(**LFM2_350M), dtype=torch.float32)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def greedy_tokens(folder: Path, ours: Path, builder: Path, new_tokens: int) -> dict:
    """Greedy continuations of PROMPTS by each runtime; and whether each equals Hugging Face's."""
    import torch
    from transformers import AutoModelForCausalLM

    from surgery.models.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def genai(path: Path, ids: list[int]) -> list[int]:
        runner = GenaiModel(str(path), 2)
        generator = runner._generator(len(ids) + new_tokens)
        generator.append_tokens(np.array(ids, np.int32))
        out = []
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out

    rows = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False)[0, len(ids):].tolist()  # fmt: skip
        runs = {
            "surgery (onnxruntime)": OnnxCausalLM(str(ours), threads=2).generate(ids, new_tokens, set()),
            "surgery (onnxruntime-genai)": genai(ours, ids),
            "builder (onnxruntime-genai)": genai(builder, ids),
        }
        rows[prompt] = {name: tokens == hf for name, tokens in runs.items()}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "lfm2.json"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-lfm2-"))
    folder, ours, builder = work / "hf", work / "ours", work / "builder"
    if not (folder / "config.json").exists():
        random_lfm2(folder)
    recipe = work / "export.surg"
    recipe.write_text(f'model "{folder}"\nexport onnx\n')
    builds = {
        "surgery apply (export onnx, verified)": measure(
            [sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(ours), "--force"]),
        "builder -p fp32 -e cpu": measure(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(builder),
             "-p", "fp32", "-e", "cpu", "-c", str(work / "builder-cache")]),
    }  # fmt: skip
    verified = json.loads((ours / "surgery.json").read_text())["verification"]["max_abs_logit_diff"]
    tokens = greedy_tokens(folder, ours, builder, 24)
    prompt = np.arange(256, dtype=np.int64) % 250
    models = {
        "builder (onnxruntime-genai)": partial(GenaiModel, str(builder), args.threads),
        "surgery (onnxruntime-genai)": partial(GenaiModel, str(ours), args.threads),
        "surgery (onnxruntime)": partial(OnnxCausalLM, str(ours), threads=args.threads),
    }
    latency, rounds = paired_latency(models, prompt, args.steps, args.rounds, "builder (onnxruntime-genai)")

    print(f"\nLFM2-350M shape (random weights), {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"\n{'export':40} {'wall s':>7} {'peak GB':>8}")
    for name, row in builds.items():
        print(f"{name:40} {row['seconds']:7.1f} {row['peak_gb']:8.2f}")
    print(f"our export verified against PyTorch: max |logit diff| {verified:.2e}")
    heading = "greedy tokens equal to Hugging Face (24 per prompt)"
    print(f"\n{heading:52} " + "  ".join(f"{p[:18]:>18}" for p in PROMPTS))
    for name in next(iter(tokens.values())):
        print(f"{name:52} " + "  ".join(f"{str(tokens[p][name]):>18}" for p in PROMPTS))
    print(f"\n{'decode after 256 tokens, batch 1':40} {'median ms':>10} {'best ms':>8} {'vs builder':>10}")
    for name, row in latency.items():
        relative = row["relative_to_builder (onnxruntime-genai)"]
        print(f"{name:40} {row['median_ms']:10.2f} {row['best_ms']:8.2f} {relative:10.3f}")
    write_result(args.json, {"shape": LFM2_350M, "builds": builds, "verified_max_abs_logit_diff": verified,
                             "tokens_equal_to_hf": tokens, "decode_ms_per_token_256": latency, "rounds": rounds,
                             "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                             "cores": os.cpu_count()})  # fmt: skip


if __name__ == "__main__":
    main()
