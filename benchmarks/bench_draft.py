"""Benchmark: speculative decoding with a `draft { ... }` on the CPU, through onnxruntime-genai.

    python benchmarks/bench_draft.py smollm2 [--drafts int8 int4 ngram] [--tokens 128] [--rounds 3]
    python benchmarks/bench_draft.py qwen --gguf FILE.gguf

For each draft, `surgery apply` builds the model's fp32 export with that draft (the apply's own
step predicts the acceptance from the draft's top-1 agreement with the target on the target's
greedy text, chooses K, and checks the tokens in genai). The benchmark then times greedy
generation of `--tokens` new tokens from 3 prompts in onnxruntime-genai with the draft and from
the target alone, interleaved `--rounds` times per prompt (the median round of each), and
prints the speed-up per prompt and its median, the measured acceptance next to the predicted
one, and whether the tokens are equal. Results go to bench-results/draft-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRAFTS = {
    "int8": "draft {\n    quantize layers to int8\n    quantize head to int8\n    quantize embedding to int8\n}\n",
    "int4": "draft {\n    quantize layers to int4\n    quantize head to int4\n    quantize embedding to int4\n}\n",
    "ngram": "draft ngram 3\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("smollm2", "qwen"))
    parser.add_argument("--gguf", help="the model's GGUF file (qwen: the concatenated PyPI chunks)")
    parser.add_argument("--drafts", nargs="+", default=["int8"], choices=sorted(DRAFTS))
    parser.add_argument("--tokens", type=int, default=128, help="new tokens to time (0: the apply's own check)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None, help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from surgery.backend.speculative import genai_speculation
    from surgery.executor.draft import PROMPTS

    spec = "smollm2-135m" if args.model == "smollm2" else args.gguf
    if not spec:
        raise SystemExit("qwen needs --gguf")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-draft-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.drafts:
        recipe = work / f"{name}.surg"
        recipe.write_text(f'model "{spec}"\ncalibrate on "wikitext-2-valid" samples 8 length 256\n{DRAFTS[name]}')
        out = work / name
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force"],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"apply failed for {name}:\n{done.stderr[-3000:]}")
        build = round(time.perf_counter() - started, 1)
        draft = json.loads((out / "surgery.json").read_text())["draft"]
        # --tokens 0: the apply's own check (64 tokens, 3 rounds) is the measurement
        measured = (genai_speculation(out, work / f"{name}-scratch", PROMPTS, args.tokens, args.rounds)
                    if args.tokens else draft["genai"])  # fmt: skip
        rows[name] = {"build_seconds": build, "draft": draft, "measured": measured}
        predicted = draft.get("predicted", {})
        print(f"{name}: predicted {predicted.get('acceptance')}, measured {measured['acceptance']}, "
              f"speed-up {measured['speedup']:.2f}x, tokens equal {measured['tokens_equal']}", flush=True)  # fmt: skip
    tokens, rounds = (args.tokens, args.rounds) if args.tokens else (64, 3)
    print(f"\n{spec}, {tokens} greedy tokens, {len(PROMPTS)} prompts, {rounds} interleaved rounds each\n")
    print(f"{'draft':8} {'K':>3} {'pred. acc.':>10} {'calib. top-1':>12} {'meas. acc.':>10} "
          f"{'target tok/s':>12} {'draft tok/s':>11} {'speed-up':>9} {'equal':>6} {'own MB':>7}")  # fmt: skip
    for name, row in rows.items():
        draft, measured = row["draft"], row["measured"]
        predicted = draft.get("predicted", {})
        target = statistics.median(p["target_tokens_per_second"] for p in measured["prompts"])
        with_draft = statistics.median(p["with_draft_tokens_per_second"] for p in measured["prompts"])
        own = (draft.get("files") or {}).get("own_bytes", 0) / 1e6
        acc = f"{predicted['acceptance']:.3f}" if predicted else "-"
        top1 = f"{predicted['top1_agreement']:.3f}" if predicted else "-"
        got = f"{measured['acceptance']:.3f}" if measured["acceptance"] is not None else "-"
        print(f"{name:8} {draft.get('max_draft_tokens', '-'):>3} {acc:>10} {top1:>12} "
              f"{got:>10} {target:>12.2f} {with_draft:>11.2f} {measured['speedup']:>8.2f}x "
              f"{'yes' if measured['tokens_equal'] else 'NO':>6} {own:>7.1f}")  # fmt: skip
    path = Path(args.json or REPO / "bench-results" / f"draft-{args.model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": spec, "tokens": args.tokens, "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
