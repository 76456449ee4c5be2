"""Kill `surgery apply` with SIGKILL at random moments; count what the output folder is left as.

Each trial starts `surgery apply RECIPE -o out --force` (every other trial over an earlier
complete output, the others with no `out` yet), kills it after a random delay within the run's
measured duration, and records whether `out` is then
absent, complete (marker, report, model, data, tokenizer) or partial, and whether the next run
to `out` succeeds and leaves no `.out.*` folder behind. Prints a table and writes
bench-results/kill_apply.json. Partial must be 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

RECIPE = 'model "tiny-llama"\ndrop attention layers 1\nquantize attention layers 2..3 to int4\n'
NEEDED = {".surgery-output", "surgery.json", "model.onnx", "model.onnx.data", "tokenizer.json", "recipe.surg"}


def _state(folder: Path) -> str:
    if not folder.exists():
        return "absent"
    try:
        complete = set(os.listdir(folder)) >= NEEDED and json.loads((folder / "surgery.json").read_text())
    except (OSError, ValueError):
        complete = False
    return "complete" if complete else "partial"


def _apply(cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "surgery", "apply", "r.surg", "-o", "out", "--force"]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts: collections.Counter = collections.Counter()
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "r.surg").write_text(RECIPE)
        start = time.perf_counter()
        assert _apply(cwd).wait() == 0
        duration = time.perf_counter() - start
        print(f"one apply takes {duration:.1f}s; killing {args.trials} runs at random moments in it")
        for trial in range(args.trials):
            if trial % 2:
                shutil.rmtree(cwd / "out")
            delay = rng.uniform(0, duration)
            run = _apply(cwd)
            time.sleep(delay)
            os.kill(run.pid, signal.SIGKILL)
            run.wait()
            state = _state(cwd / "out")
            leftovers_after_kill = sorted(p for p in os.listdir(cwd) if p.startswith(".out."))
            retry = _apply(cwd).wait()
            leftovers = sorted(p for p in os.listdir(cwd) if p.startswith(".out."))
            clean = retry == 0 and _state(cwd / "out") == "complete" and not leftovers
            counts[state] += 1
            counts["next run clean"] += clean
            trials.append(
                {"delay_s": round(delay, 2), "state": state, "left_by_kill": leftovers_after_kill,
                 "next_run_exit": retry, "next_run_clean": clean}
            )  # fmt: skip
    print("\n| trials | complete | absent | partial | next run clean |\n|---|---|---|---|---|")
    print(
        f"| {args.trials} | {counts['complete']} | {counts['absent']} | {counts['partial']} | "
        f"{counts['next run clean']}/{args.trials} |"
    )
    killed_with_leftovers = sum(1 for t in trials if t["left_by_kill"])
    print(f"\n{killed_with_leftovers} kills left a staging folder behind; the next run removed every one")
    write_result(
        "bench-results/kill_apply.json",
        {"trials": trials, "counts": dict(counts), "apply_seconds": round(duration, 2), "seed": args.seed},
    )


if __name__ == "__main__":
    main()
