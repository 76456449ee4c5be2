"""The KV cache as a budget: bytes per token, long-window perplexity, pass-key retrieval and
decode latency at long prompts, for a float cache, int8 and int4 caches (GroupQueryAttention's, and
int4 `pre-rope`), attention dropped in the least important layers, and a budgeted combination.

Every variant is built by `surgery apply` from a one-line change to the same recipe and
measured here in onnxruntime on the same tokens: perplexity on non-overlapping windows of
`--window` tokens of WikiText-2 test (streamed a piece at a time through each output's own KV
cache), KL and top-1 against the float-cache output, pass keys found at `--retrieval` lengths
(5 depths each), decode ms per token after prompts of `--lengths` tokens. Prints a table, writes
JSON (default bench-results/kv-cache-<model>.json).

    python benchmarks/bench_kv_cache.py smollm2 --lengths 2048 8000 --budget 47.2 8192 [--layout pre-rope]
    python benchmarks/bench_kv_cache.py qwen --gguf FILE --retrieval 4096 16384 --lengths 2048 8192 32768
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import measure, size_mb, write_result  # noqa: E402

CALIBRATE = 'calibrate on "wikitext-2-valid" samples 32 length 256\n'


def variants(drop: int, budget: tuple[float, int, float, int | None] | None = None, layout: str = "") -> dict[str, str]:
    """Name -> the statements after the model line (the float cache has none). `budget` (MB, at
    tokens, perplexity increase %, most drops or None): the budgeted combination, the joint search
    of dropped attention layers against int8/int4 cache widths (in `layout`: "" for
    GroupQueryAttention's, "pre-rope"), each combination scored on WikiText-2 valid (the table
    scores on test)."""
    found = {}
    if budget is not None:
        mb, tokens, increase, most = budget
        bound = f" up to {most}" if most else ""
        option = f" {layout}" if layout else ""
        found[f"budgeted{option}: {mb:g} MB at {tokens}"] = (
            CALIBRATE + f"quantize kv-cache by similarity as many as fit {{\n    most important -> int8{option}\n"
            f"    rest -> int4{option}\n    or drop attention least important{bound}\n"
            f"    kv-cache at most {mb:g} MB at {tokens} tokens\n"
            f'    perplexity on "wikitext-2-valid" max-increase {increase:g}% tokens 4096 window 4096\n}}\n'
        )
    return {
        "fp cache": "",
        "int8 cache": CALIBRATE + "quantize kv-cache to int8\n",
        "int4 cache": CALIBRATE + "quantize kv-cache to int4\n",
        "int4 pre-rope cache": CALIBRATE + "quantize kv-cache to int4 pre-rope\n",
        f"attention dropped in {drop}": CALIBRATE + f"drop attention least important {drop} by similarity\n",
        f"attention dropped in {drop} + int4": CALIBRATE + f"drop attention least important {drop} by similarity\n"
        "quantize kv-cache to int4\n",
        **found,
    }


def _model(args) -> str:
    if args.model == "qwen":
        if not args.gguf:
            raise SystemExit("qwen needs --gguf (benchmarks/bench_scale.py fetches it)")
        return args.gguf
    return "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("smollm2", "qwen"))
    parser.add_argument("--gguf", default=None, help="the Qwen2.5-Coder-1.5B GGUF")
    parser.add_argument("--drop", type=int, default=None, help="attention layers dropped (default: a quarter)")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--retrieval", type=int, nargs="*", default=[4096])
    parser.add_argument("--depths", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="only variants whose name has one (or is one)")  # fmt: skip
    parser.add_argument("--budget", type=float, nargs="+", default=None, metavar="MB TOKENS [INCREASE [DROPS]]",
                        help="the budgeted combination: cache MB at TOKENS, searched jointly (attention dropped, "
                        "int8/int4 widths) for the best WikiText-2 valid perplexity within INCREASE %% (default 100), "
                        "with at most DROPS drops")  # fmt: skip
    parser.add_argument("--layout", choices=("", "pre-rope"), default="",
                        help="the budgeted combination's cache layout (default: GroupQueryAttention's)")  # fmt: skip
    parser.add_argument("--measure", nargs="+", choices=("perplexity", "retrieval", "decode"),
                        default=["perplexity", "retrieval", "decode"],
                        help="what to measure (decode alone on a quiet machine: its ms are timings)")  # fmt: skip
    parser.add_argument("--keep", type=Path, default=None, help="build into this folder; reuse what is there")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    started = time.perf_counter()

    from surgery.backend.evaluate import compare, eval_tokens, perplexity, session_logits
    from surgery.backend.latency import decode_once, latency_prompt
    from surgery.backend.retrieval import found_by_output, retrieval_prompts, summary
    from surgery.backend.runtime import OnnxCausalLM
    from surgery.data import resolve_text
    from surgery.model_folder import open_model_folder
    from surgery.models.index import ModelIndex
    from surgery.models.loading import load_config
    from surgery.models.specs import resolve_spec

    spec = _model(args)
    layers = ModelIndex.from_config(spec, load_config(resolve_spec(spec))).num_layers
    drop = args.drop if args.drop is not None else layers // 4
    work = args.keep or Path(tempfile.mkdtemp(prefix="surgery-kv-"))
    work.mkdir(parents=True, exist_ok=True)
    budget = None
    if args.budget:
        if not 2 <= len(args.budget) <= 4:
            parser.error("--budget takes MB TOKENS [INCREASE [DROPS]]")
        increase = args.budget[2] if len(args.budget) > 2 else 100.0
        budget = (args.budget[0], int(args.budget[1]), increase, int(args.budget[3]) if len(args.budget) > 3 else None)
    every = variants(drop, budget, args.layout)
    exact = [o for o in args.only or () if o in every]  # a whole name picks that variant alone
    chosen = {name: body for name, body in every.items()
              if name == "fp cache" or not args.only or name in exact
              or any(o in name for o in args.only if o not in exact)}  # fmt: skip
    folders, builds = {}, {}
    for name, body in chosen.items():
        slug = "".join(c if c.isalnum() else "-" for c in name)
        out, record = work / slug, work / f"{slug}.build.json"
        if args.keep and record.exists() and (out / "model.onnx").exists():
            folders[name], builds[name] = out, json.loads(record.read_text())
            continue
        recipe = work / f"{slug}.surg"
        recipe.write_text(f'model "{spec}"\n{body}')
        print(f"building {name} ...", flush=True)
        builds[name] = measure([sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force",
                                "--no-verify"])  # fmt: skip
        record.write_text(json.dumps(builds[name]))
        folders[name] = out

    tokenizer = open_model_folder(str(folders["fp cache"])).tokenizer
    tokens = eval_tokens(tokenizer, resolve_text("wikitext-2-test"), args.tokens, args.window)
    prompts = retrieval_prompts(tokenizer, tuple(args.retrieval), args.depths)
    # One session per output at a time (Qwen's fp32 weights are 7 GB a copy): the reference's,
    # and the row's, dropped before the next row opens its own.
    reference_model = reference = None  # only perplexity compares against it
    if "perplexity" in args.measure:
        reference_model = OnnxCausalLM(str(folders["fp cache"]), threads=args.threads)
        reference = session_logits(reference_model, stream=True)
    rows = {}
    for name, folder in folders.items():
        report = json.loads((folder / "surgery.json").read_text())
        cache = report["kv_cache"]
        before = cache["before"]["bytes_per_token"]
        fp16 = before // 2 if report["export"]["precision"] == "fp32" else before  # the same layers at 2 bytes
        row = {"bytes_per_token": cache["after"]["bytes_per_token"], "fp16_bytes_per_token": fp16,
               "mb": round(size_mb(folder), 1), "kv_layers": len(cache["slots"]),
               **{f"build_{k}": v for k, v in builds[name].items()}}  # fmt: skip
        row["vs_fp16"] = round(fp16 / row["bytes_per_token"], 2)
        if name == "fp cache" and reference_model is not None:
            model = reference_model
        else:
            model = OnnxCausalLM(str(folder), threads=args.threads)
        if "perplexity" in args.measure:
            print(f"{name}: perplexity ...", flush=True)
            if model is reference_model:  # the reference itself: scored once, KL 0 and top-1 1 by definition
                row.update(perplexity=round(perplexity(reference, tokens).perplexity, 3), mean_kl=0.0, top1=1.0)
            else:
                result = compare(session_logits(model, stream=True), reference, tokens)
                row.update(perplexity=round(result.candidate.perplexity, 3), mean_kl=round(result.mean_kl, 5),
                           top1=round(result.top1_agreement, 4))  # fmt: skip
        if "retrieval" in args.measure:
            print(f"{name}: retrieval ...", flush=True)
            found = summary(prompts, found_by_output(model, prompts))
            row["retrieval"] = {length: entry["accuracy"] for length, entry in found["lengths"].items()}
            row["retrieval_tries"] = found["lengths"]
        if "decode" in args.measure:
            row["decode_ms"] = {}
            for length in args.lengths:
                print(f"{name}: decode after {length} tokens ...", flush=True)
                prompt = latency_prompt(length, str(folder))
                row["decode_ms"][str(length)] = round(statistics.median(decode_once(model, prompt, args.steps)
                                                                        for _ in range(2)), 2)  # fmt: skip
        rows[name] = row
        del model
        print(f"  {row}", flush=True)

    print(f"\n{spec}, {os.cpu_count()} cores; WikiText-2 test, {tokens.scored()} tokens in windows of {args.window}; "
          f"retrieval at {args.retrieval} ({args.depths} depths)\n")  # fmt: skip
    _table(rows, args)
    write_result(args.json or str(REPO / "bench-results" / f"kv-cache-{args.model}.json"), {
        "model": spec,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "measured": args.measure,
        "protocol": {"tokens": tokens.scored(), "window": args.window, "retrieval": args.retrieval,
                     "depths": args.depths, "decode_lengths": args.lengths, "decode_steps": args.steps,
                     "threads": args.threads},  # fmt: skip
        "recipes": {name: f'model "{spec}"\n{body}' for name, body in chosen.items()},
        "variants": rows,
        "seconds": round(time.perf_counter() - started, 1),
    })  # fmt: skip


def _table(rows: dict[str, dict], args) -> None:
    """The rows as a table; what was not measured shows as "-"."""
    fp = rows["fp cache"].get("perplexity")

    def cell(value, form: str, width: int) -> str:
        if value is None:
            return f"{'-':>{width}}"
        sign = "+" if form.startswith("+") else ""
        return f"{value:>{sign}{width}{form.lstrip('+')}}"

    lengths = " ".join(f"{'ms@' + str(n):>9}" for n in args.lengths)
    retrieved = " ".join(f"{'keys@' + str(n):>10}" for n in args.retrieval)
    print(f"{'variant':34} {'KV B/tok':>9} {'vs fp16':>8} {'ppl':>8} {'vs fp':>7} {'KL':>8} {'top-1':>6} "
          f"{retrieved} {lengths}")  # fmt: skip
    for name, row in rows.items():
        found, ms = row.get("retrieval", {}), row.get("decode_ms", {})
        keys = " ".join(cell(found.get(str(n)), ".0%", 10) for n in args.retrieval)
        times = " ".join(cell(ms.get(str(n)), ".2f", 9) for n in args.lengths)
        ppl = row.get("perplexity")
        change = ppl / fp - 1 if ppl is not None and fp else None
        quality = f"{cell(ppl, '.3f', 8)} {cell(change, '+.2%', 7)} {cell(row.get('mean_kl'), '.4f', 8)}"
        print(f"{name:34} {row['bytes_per_token']:>9,} {row['vs_fp16']:>7.2f}x {quality} "
              f"{cell(row.get('top1'), '.3f', 6)} {keys} {times}")  # fmt: skip


if __name__ == "__main__":
    main()
