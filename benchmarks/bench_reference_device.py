"""Benchmark: the PyTorch reference perplexity of `surgery eval --against MODEL` and of
`verify perplexity`, on the CPU and with sequential onloading on a GPU (`--device cuda`).

    python benchmarks/bench_reference_device.py FOLDER [--tokens 2048] [--window 512]

FOLDER is a Hugging Face checkpoint (e.g. one written by `random_llama.py`). For each device
(cpu, and cuda when PyTorch sees one), in a fresh process: wall seconds of `graph_perplexity`
(the code path of both commands: the model loaded lazily, every window's hidden state through
one layer at a time on that device), the process's peak RSS, the GPU's peak allocated memory,
and the mean NLL, which must agree between devices. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result  # noqa: E402


def one(folder: str, device: str, tokens: int, window: int) -> dict:
    """`graph_perplexity` of the lazily loaded model on `device`; what it cost."""
    import torch

    from surgery.architectures.conformance import checked_graph
    from surgery.backend.evaluate import eval_tokens, graph_perplexity
    from surgery.data import resolve_text
    from surgery.models.index import ModelIndex
    from surgery.models.loading import load_config, load_model
    from surgery.models.specs import resolve_spec

    spec = resolve_spec(folder)
    model, tokenizer, weights = load_model(spec, lambda _: None, lazy=True)
    graph = checked_graph(model, ModelIndex.from_config(folder, load_config(spec)), weights)
    text = eval_tokens(tokenizer, resolve_text("wikitext-2-test"), tokens, window)
    started = time.perf_counter()
    result = graph_perplexity(graph, text, device=None if device == "cpu" else device)
    seconds = time.perf_counter() - started
    return {
        "device": device,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
        "mean_nll": result.mean_nll,
        "perplexity": result.perplexity,
        "tokens_scored": result.tokens_scored,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one device
    parser.add_argument("--json", default=str(REPO / "bench-results" / "reference-device.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.folder, args.one, args.tokens, args.window)))
        return
    import torch

    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = []
    for device in devices:
        command = [sys.executable, __file__, args.folder, "--one", device, "--tokens", str(args.tokens),
                   "--window", str(args.window)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{device}: exit {out.returncode}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{args.folder}: perplexity of {runs[0]['tokens_scored']} tokens, windows of {args.window}")
    print(f"{'device':8} {'wall s':>8} {'peak RSS GB':>12} {'peak GPU GB':>12} {'mean NLL':>12}")
    for run in runs:
        gpu = f"{run['peak_gpu_gb']:.2f}" if run["peak_gpu_gb"] is not None else "-"
        print(f"{run['device']:8} {run['seconds']:>8.1f} {run['peak_rss_gb']:>12.2f} {gpu:>12} "
              f"{run['mean_nll']:>12.6f}")  # fmt: skip
    spread = max(r["mean_nll"] for r in runs) - min(r["mean_nll"] for r in runs)
    print(f"mean NLL spread across devices: {spread:.2e}")
    write_result(args.json, {"folder": args.folder, "tokens": args.tokens, "window": args.window, "runs": runs,
                             "mean_nll_spread": spread})  # fmt: skip


if __name__ == "__main__":
    main()
