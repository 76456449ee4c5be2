"""Benchmark: budget searches (`as many as fit`) against exhaustive sweeps, and a size-budgeted
mixed-precision search against onnxruntime-genai's builder int4.

1. `drop attention least important by similarity as many as fit { perplexity ... max-increase
   L% }` for each limit L: the bisecting search, measured fresh (no cached candidates), against
   `search exhaustive` (every count, also fresh, measured once; its candidates then answer
   every limit). Per limit: both answers, candidates built, wall time.
2. (`--mixed`, SmolLM2) `quantize layers by lim as many as fit { most important -> <first>;
   rest -> <rest>; size at most <builder's MB> }` (`--first`, `--rest`; `gptq` after a width
   rounds by GPTQ) with the embedding at int4 block 32 symmetric and the tied head at `--head`
   (default the same: the builder's settings), then perplexity of the answer and of the
   builder's `-p int4 -e cpu` model on the same 16,384 tokens.
3. (`--ray`) the first limit's bisecting search again through `--executor ray` (fresh).

    python benchmarks/bench_search.py smollm2 --mixed --ray
    python benchmarks/bench_search.py qwen --tokens 1024     # the converted Qwen2.5-Coder-1.5B folder

Writes bench-results/search-<model>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import size_mb, write_result  # noqa: E402

DROP = """model "{model}"
calibrate on "wikitext-2-valid" samples 64 length 256
drop attention least important by similarity as many as fit {{
    perplexity on "wikitext-2-test" max-increase {limit}% tokens {tokens} window 512
    search {method}
}}
export onnx
"""

MIXED = """model "smollm2-135m"
calibrate on "wikitext-2-valid" samples 64 length 256
quantize embedding to int4 symmetric
quantize head to {head}
quantize layers by lim as many as fit {{
    most important -> {first}
    rest -> {rest}
    size at most {mb} MB
    perplexity on "wikitext-2-test" max-increase 50% tokens {tokens} window 512
}}
export onnx
"""


def run_search(work: Path, name: str, text: str, executor: str = "process", fresh: bool = True) -> dict:
    """Compile the recipe (its searches run) and return the first search's record with the wall time."""
    from surgery.pipeline import compile_recipe
    from surgery.search.engine import SearchSettings

    path = work / f"{name}.surg"
    path.write_text(text)
    start = time.perf_counter()
    compiled = compile_recipe(str(path), verify=False, progress=lambda m: print(f"  [{name}] {m}", flush=True),
                              search=SearchSettings(executor=executor, use_cache=not fresh))  # fmt: skip
    wall = time.perf_counter() - start
    search = compiled.searches[0]
    return {
        "answer": search.answer.count,
        "layers": list(search.answer.layers),
        "measured": len(search.candidates),
        "built": search.built(),
        "counts_possible": search.maximum + 1,
        "wall_s": round(wall, 1),
        "candidates": {c.count: round(next(iter(c.measured["values"].values())), 3) for c in search.candidates},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("smollm2", "qwen"))
    parser.add_argument("--limits", type=float, nargs="+", default=[10, 25])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--mixed", action="store_true")
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--first", default="int8 symmetric", help="the width of the searched layers")
    parser.add_argument("--rest", default="int4 block 64", help="the width of the other layers")
    parser.add_argument("--head", default="int4 symmetric", help="the head's width (tied: shared with the embedding)")
    parser.add_argument("--only-mixed", action="store_true", help="skip the drop searches")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from surgery.models import builtin

    spec = "smollm2-135m"
    if args.model == "qwen":
        cache = builtin.cache_dir() / "models"
        spec = str(next(cache.glob("qwen2.5-coder-1.5b-instruct-*")))
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-search-"))
    result: dict = {"model": spec, "tokens": args.tokens, "cores": os.cpu_count(), "limits": {}}

    def recipe(limit: float, method: str) -> str:
        return DROP.format(model=spec, limit=f"{limit:g}", tokens=args.tokens, method=method)

    exhaustive = None if args.only_mixed else run_search(work, "exhaustive", recipe(args.limits[0], "exhaustive"))
    result["exhaustive_first_limit"] = exhaustive
    for limit in [] if args.only_mixed else args.limits:
        swept = run_search(work, f"exhaustive-{limit:g}", recipe(limit, "exhaustive"), fresh=False)
        bisected = run_search(work, f"bisect-{limit:g}", recipe(limit, "bisect"))
        result["limits"][f"{limit:g}"] = {"exhaustive": swept["answer"], "bisect": bisected,
                                          "exhaustive_layers": swept["layers"]}  # fmt: skip
    if args.ray:
        result["ray"] = run_search(work, "ray", recipe(args.limits[0], "bisect"), executor="ray")
    if args.mixed:
        builder = work / "builder-int4"
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(builtin.smollm2_folder()), "-o",
             str(builder), "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")],
            check=True, capture_output=True,
        )  # fmt: skip
        mb = size_mb(builder)
        mixed_recipe = work / "mixed.surg"
        mixed_recipe.write_text(
            MIXED.format(mb=f"{mb:.2f}", tokens=args.tokens, first=args.first, rest=args.rest, head=args.head)
        )
        mixed = run_search(work, "mixed", mixed_recipe.read_text())
        out = work / "mixed-out"
        subprocess.run([sys.executable, "-m", "surgery", "apply", str(mixed_recipe), "-o", str(out), "--no-verify"],
                       check=True, capture_output=True)  # fmt: skip
        from transformers import AutoTokenizer

        from surgery.backend.evaluate import eval_tokens, onnx_logits, perplexity
        from surgery.data import resolve_text

        tokenizer = AutoTokenizer.from_pretrained(builtin.smollm2_folder())
        tokens = eval_tokens(tokenizer, resolve_text("wikitext-2-test"), 16384)
        result["mixed"] = {
            "search": mixed,
            "builder_mb": round(mb, 2),
            "ours_mb": round(size_mb(out), 2),
            "builder_perplexity_16k": round(perplexity(onnx_logits(str(builder), 2), tokens).perplexity, 3),
            "ours_perplexity_16k": round(perplexity(onnx_logits(str(out), 2), tokens).perplexity, 3),
        }
    print(f"\n{args.model}: attention drops within a perplexity budget ({args.tokens} tokens of WikiText-2 test)")
    print(f"{'limit':>6} {'exhaustive':>10} {'bisect':>7} {'built':>6} {'of':>4} {'bisect s':>9}")
    for limit, row in result["limits"].items():
        b = row["bisect"]
        print(f"{limit + '%':>6} {row['exhaustive']:>10} {b['answer']:>7} {b['built']:>6} {b['counts_possible']:>4} "
              f"{b['wall_s']:>9}")  # fmt: skip
    if exhaustive:
        print(f"exhaustive sweep: {exhaustive['built']} candidates in {exhaustive['wall_s']} s")
    if "ray" in result:
        print(f"ray: answer {result['ray']['answer']}, {result['ray']['built']} built, {result['ray']['wall_s']} s")
    if "mixed" in result:
        print(f"mixed: {result['mixed']}")
    default = f"search-{args.model}{'-mixed' if args.only_mixed else ''}.json"
    write_result(args.json or str(REPO / "bench-results" / default), result)


if __name__ == "__main__":
    main()
