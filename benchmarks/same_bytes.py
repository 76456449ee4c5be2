"""Benchmark: a refactor changes nothing for users. Every example applied by an earlier commit and
by this checkout, in turn: the written model files' SHA-256 and the wall times, side by side.

    python benchmarks/same_bytes.py fc46327 [--no-verify] [--only drop-attention fuse-layer]

The earlier commit is checked out into a temporary git worktree and run from there
(`PYTHONPATH`), with the same interpreter and packages; each example runs with its own recipe of
that commit. Prints a table and writes bench-results/same-bytes.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result  # noqa: E402

FILES = ("model.onnx", "model.onnx.data")


def digest(path: Path) -> str | None:
    """The file's SHA-256 (None when it is missing)."""
    if not path.exists():
        return None
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def apply(checkout: Path, example: str, out: Path, verify: bool) -> dict:
    """`python -m surgery apply` of one example of `checkout`, run from that checkout."""
    command = [sys.executable, "-m", "surgery", "apply", str(checkout / "examples" / f"{example}.surg"), "-o", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command + ([] if verify else ["--no-verify"]), cwd=out.parent, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(checkout)})  # fmt: skip
    seconds = time.perf_counter() - start
    return {"exit": done.returncode, "seconds": round(seconds, 1), **{name: digest(out / name) for name in FILES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="the earlier commit to compare with")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, metavar="EXAMPLE")
    parser.add_argument("--json", default=str(REPO / "bench-results" / "same-bytes.json"))
    args = parser.parse_args()
    examples = sorted(p.stem for p in (REPO / "examples").glob("*.surg"))
    examples = [e for e in examples if not args.only or e in args.only]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="surgery-same-bytes-") as work:
        earlier = Path(work) / "earlier"
        git = ["git", "-C", str(REPO), "worktree"]
        subprocess.run([*git, "add", "--detach", "-q", str(earlier), args.commit], check=True)
        try:
            for example in examples:
                if not (earlier / "examples" / f"{example}.surg").exists():
                    rows[example] = {"skipped": "not an example at the earlier commit"}
                    continue
                old = apply(earlier, example, Path(work) / f"{example}-earlier", not args.no_verify)
                new = apply(REPO, example, Path(work) / f"{example}-now", not args.no_verify)
                same = old["exit"] == new["exit"] == 0 and all(old[f] == new[f] is not None for f in FILES)
                rows[example] = {"earlier": old, "now": new, "same_bytes": same}
                verdict = "same" if same else "DIFFERENT"
                print(f"{example:28} {old['seconds']:>7.1f}s {new['seconds']:>7.1f}s  {verdict}", flush=True)
        finally:
            subprocess.run([*git, "remove", "--force", str(earlier)], check=False)
    same = all(row.get("same_bytes", True) for row in rows.values())
    verdict = "every example writes the same bytes" if same else "some example differs"
    print(f"\n{verdict} ({args.commit} against this checkout)")
    write_result(args.json, {"benchmark": "same-bytes", "commit": args.commit, "verify": not args.no_verify,
                             "examples": rows, "all_same": same})  # fmt: skip


if __name__ == "__main__":
    main()
