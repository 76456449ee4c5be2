"""Fuzz `surgery check` with generated and mutated recipes; print the counts by outcome.

Runs N cases (default 10,000) of tests/fuzzer.py in-process, each through `surgery.cli.main`,
and reports how many ended as ok / error / usage / crash / wrong-line, how many took longer
than the limit (default 1 s), and the slowest cases. Before the first case, a warm-up loads
what a process loads once (the libraries, SmolLM2's tokenizer): the times are the checker's.
Crashes and slow cases are listed with the case number; `--show N` prints a case's recipe so
it can be reproduced. The hub is switched to offline mode (a recipe may name any hub id).
Writes bench-results/fuzz_check.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import write_result  # noqa: E402
from fuzzer import make_case, prepare_folder, run_case, warm_up  # noqa: E402

OUTCOMES = ("ok", "error", "usage", "crash", "wrong-line")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case number")
    parser.add_argument("--limit", type=float, default=1.0, help="seconds a case may take")
    parser.add_argument("--show", type=int, metavar="N", help="print case N's recipe (repr) and exit")
    args = parser.parse_args()
    if args.show is not None:
        case = make_case(args.show, args.seed)
        print(case.generator, repr(case.recipe[:2000]), repr((case.importance or b"")[:500]))
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    counts: collections.Counter = collections.Counter()
    by_generator: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    findings, times = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare_folder(folder)
        warm_up(folder)
        for number in range(args.start, args.start + args.cases):
            result = run_case(make_case(number, args.seed), folder, args.limit)
            counts[result.outcome] += 1
            by_generator[result.case.generator][result.outcome] += 1
            times.append((result.seconds, number, result.case.generator))
            slow = result.seconds > args.limit
            counts["slow"] += slow
            if result.outcome in ("crash", "wrong-line") or slow:
                findings.append(
                    {"case": number, "generator": result.case.generator, "outcome": result.outcome,
                     "seconds": round(result.seconds, 3), "detail": result.detail[-300:]}
                )  # fmt: skip
            if (number - args.start + 1) % 1000 == 0:
                print(f"  {number - args.start + 1} cases, {time.perf_counter() - start:.0f}s", file=sys.stderr)
    total = time.perf_counter() - start
    times.sort(reverse=True)
    print(f"\n{args.cases} cases (seed {args.seed}) in {total:.0f}s, limit {args.limit:g}s per case\n")
    print(f"| {'generator':<11} | " + " | ".join(f"{o:>10}" for o in OUTCOMES) + " |")
    print("|" + "---|" * 6)
    for generator, counted in sorted(by_generator.items()):
        row = " | ".join(f"{counted[o]:>10}" for o in OUTCOMES)
        print(f"| {generator:<11} | {row} |")
    row = " | ".join(f"{counts[o]:>10}" for o in OUTCOMES)
    print(f"| {'all':<11} | {row} |")
    print(f"\nover {args.limit:g}s: {counts['slow']}; slowest: "
          + ", ".join(f"case {n} ({g}) {s:.2f}s" for s, n, g in times[:5]))  # fmt: skip
    for finding in findings[:20]:
        print(f"  {finding}")
    write_result(
        "bench-results/fuzz_check.json",
        {
            "cases": args.cases,
            "seed": args.seed,
            "limit_s": args.limit,
            "seconds": round(total, 1),
            "counts": dict(counts),
            "by_generator": {g: dict(c) for g, c in by_generator.items()},
            "slowest": [{"case": n, "generator": g, "seconds": round(s, 3)} for s, n, g in times[:20]],
            "findings": findings,
        },
    )


if __name__ == "__main__":
    main()
