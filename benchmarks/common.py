"""Helpers shared by the benchmarks: timing a command in a fresh process, decode latency."""

from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def measure(command: list[str]) -> dict:
    """Wall seconds and peak RSS (GB) of one command, in a fresh measuring process."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True
    ).stdout.split()
    rc, seconds, max_rss_kb = int(out[-3]), float(out[-2]), int(out[-1])
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(command)}")
    return {"seconds": round(seconds, 2), "peak_gb": round(max_rss_kb / 1e6, 3)}


def decode_ms_per_token(model, prompt: np.ndarray, steps: int) -> float:
    """ms/token of one-token decode steps after prefilling `prompt` (batch 1): one round of
    the package's protocol (surgery/backend/latency.py), which budgets use too."""
    from surgery.backend.latency import decode_once

    return decode_once(model, prompt, steps)


def paired_latency(
    loaders: dict[str, Callable[[], object]], prompt: np.ndarray, steps: int, rounds: int, baseline: str
) -> tuple[dict, dict]:
    """Decode latency in rounds that visit every model in turn (a shared machine drifts).

    `loaders` maps a name to a function that opens the model. Every round opens the models
    afresh in a rotated order and times them in that order: on this machine the session
    opened first decodes up to 6% slower than one opened later (the same model opened twice
    in one process shows it), so a fixed order would favour whichever model comes later.

    Returns per model: median and best ms/token and the median over rounds of its time
    relative to `baseline` in the same round; and the raw rounds.
    """
    names = list(loaders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        models = {name: loaders[name]() for name in order}
        for name, model in models.items():
            # A model driven by another runtime (onnxruntime-genai) times itself the same way.
            own = getattr(model, "decode_ms_per_token", None)
            times[name].append(own(prompt, steps) if own else decode_ms_per_token(model, prompt, steps))
        del models, model
        gc.collect()
    base = times[baseline]
    rows = {
        name: {
            "median_ms": round(statistics.median(values), 2),
            "best_ms": round(min(values), 2),
            f"relative_to_{baseline}": round(statistics.median(v / b for v, b in zip(values, base, strict=True)), 3),
        }
        for name, values in times.items()
    }
    return rows, {name: [round(v, 3) for v in values] for name, values in times.items()}


def apply_recipe(work: Path, name: str, text: str) -> Path:
    """`surgery apply --no-verify` of the recipe `text` in a fresh process; returns the output folder."""
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")[:60]
    recipe = work / f"{slug}.surg"
    recipe.write_text(text)
    out = work / slug
    command = [sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--force", "--no-verify"]
    subprocess.run(command, check=True, capture_output=True)
    return out


def size_mb(folder: Path) -> float:
    """model.onnx + model.onnx.data in MB."""
    return sum(os.path.getsize(folder / f) for f in ("model.onnx", "model.onnx.data")) / 1e6


def write_result(path: str, result: dict) -> None:
    """Write a benchmark's result as JSON (creating the folder) and say where."""
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


class GenaiModel:
    """A model folder run by onnxruntime-genai (its own KV cache handling), timed like ours."""

    def __init__(self, folder: str, threads: int):
        import json
        from pathlib import Path

        import onnxruntime_genai as og

        config_path = Path(folder) / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
        config_path.write_text(json.dumps(config, indent=4))
        self.og = og
        self.model = og.Model(folder)

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(T, vocab) logits of one window from an empty context."""
        generator = self._generator(ids.shape[1] + 1)
        generator.append_tokens(ids.astype(np.int32))
        return np.asarray(generator.get_output("logits"))[0]

    def decode_ms_per_token(self, prompt: np.ndarray, steps: int) -> float:
        """ms/token of greedy one-token steps after prefilling `prompt` (4 warm-up steps untimed)."""
        warmup = 4
        # The builder's sliding-window layers want a KV buffer of at least their window.
        generator = self._generator(max(len(prompt) + warmup + steps + 1, 2048))
        generator.append_tokens(prompt.astype(np.int32))
        start = 0.0
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            generator.generate_next_token()
        return (time.perf_counter() - start) / steps * 1000


# int4 recipes the quality and time benchmarks share: every linear, the head and the embedding
RTN = "quantize layers to int4\nquantize head to int4\nquantize embedding to int4\n"
GPTQ = "quantize layers to int4 gptq\nquantize head to int4 gptq\nquantize embedding to int4\n"


def preset(budget: str) -> tuple[str, str]:
    """A `quantize model` row from its short form (`4.9`, `4.9g` with gptq, `4.9ga` with gptq
    act-order): (its name, e.g. "4.9 bpw gptq", and its statement line)."""
    options = budget.lstrip("0123456789.")
    bits = float(budget[: len(budget) - len(options)])
    words = (" gptq" if "g" in options else "") + (" act-order" if "a" in options else "")
    return f"{bits:g} bpw{words}", f"quantize model to {bits:g} bits per weight{words}\n"
