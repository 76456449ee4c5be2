"""Benchmark: how long the commands that need no model weights take to answer, in fresh processes.

Each command runs `--rounds` times in a new Python process (what a user waits for: interpreter
start, imports, the work); reported are the median and the best wall time. The target is under
1 s for `surgery --help`, `surgery check` of a recipe without calibration (its model's index
read from the cache after the first check) and an error that needs no model. Also listed: which
heavy libraries each command imported (none should, for these).

    python benchmarks/bench_startup.py [--rounds 7] [--json bench-results/startup.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result  # noqa: E402

HEAVY = ("torch", "transformers", "onnx", "onnxruntime")
# Runs the CLI in this process and reports which heavy modules it imported.
_PROBE = (
    "import sys\n"
    "from surgery.cli import main\n"
    "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


def timed(argv: list[str], cwd: str) -> tuple[float, list[str]]:
    """Wall seconds of one `surgery argv` in a fresh process, and the heavy modules it imported."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY ")), "?")
    return seconds, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default="bench-results/startup.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        Path(work, "nocal.surg").write_text(
            'model "smollm2-135m"\ndrop attention layers 4, 7, 18\nquantize layers 0..9 to int4\nexport onnx\n'
        )
        Path(work, "typo.surg").write_text('model "smollm2-135m"\ndrop atention layers 4\n')
        commands = {
            "surgery --help": ["--help"],
            "surgery check (no calibration)": ["check", "nocal.surg"],
            "surgery check examples/drop-attention.surg": ["check", str(REPO / "examples" / "drop-attention.surg")],
            "surgery check (syntax error)": ["check", "typo.surg"],
            "surgery check (no such file)": ["check", "nosuch.surg"],
        }
        timed(["check", "nocal.surg"], work)  # the first check keeps the model's index
        rows = {}
        for name, argv in commands.items():
            runs = [timed(argv, work) for _ in range(args.rounds)]
            seconds = [s for s, _ in runs]
            rows[name] = {
                "median_s": round(statistics.median(seconds), 3),
                "best_s": round(min(seconds), 3),
                "heavy_imports": runs[-1][1],
                "under_1s": statistics.median(seconds) < 1.0,
            }
    print(f"{'command':<46} {'median':>8} {'best':>8}  heavy imports")
    for name, row in rows.items():
        print(f"{name:<46} {row['median_s']:>7.3f}s {row['best_s']:>7.3f}s  {row['heavy_imports']}")
    write_result(args.json, {
        "benchmark": "startup",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rounds": args.rounds,
        "commands": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
