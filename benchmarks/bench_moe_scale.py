"""Benchmark: pruning and merging the experts of a mixture of experts larger than comfort, a layer
at a time, against the whole model loaded (the implementation before, or `--before`'s checkout).

    python benchmarks/bench_moe_scale.py [--work /tmp/surgery-moe-scale] [--before /path/to/old/checkout]

The model: random weights of a Mixtral shape (8 layers, hidden 1024, 32 experts of 3 x 1024 x
2048, top 2, vocab 49152),
written once into the work folder. For each recipe, `surgery apply` in a fresh process: wall
time, peak RSS, output size, verification. `--before` runs the same commands from another
checkout (e.g. `git worktree add /tmp/before 3ba1d91`, the commit before prune and merge
streamed), for the whole-model figures of the same run; its `surgery/passes` and
`surgery/grammar` are linked to `passes/` and `grammar/` (as the installed package maps them)
when missing. Commands run from the work folder, so the current folder's `surgery/` is never
imported instead. A first, untimed apply fills the description check's cache (a first run on
a new checkpoint probes the model once), so no measured run pays for it. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402  (run from a checkout without installing)
sys.path.insert(0, str(REPO / "benchmarks"))

from common import measure, write_result  # noqa: E402

SHAPE = {
    "num_hidden_layers": 8,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_local_experts": 32,
    "num_experts_per_tok": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 49152,  # SmolLM2's tokenizer, whose ids must all be rows
    "max_position_embeddings": 4096,
}
CALIBRATION = 'calibrate on "wikitext-2-valid" samples 8 length 128\n'
RECIPES = {
    "prune 32 -> 8, --no-verify": (CALIBRATION + "prune experts layers * to 8\n", ["--no-verify"]),
    "prune 32 -> 8, verified": (CALIBRATION + "prune experts layers * to 8\n", []),
    "merge 32 -> 8, verified": (CALIBRATION + "merge experts layers * to 8\n", []),
}


def random_mixtral(folder: Path) -> Path:
    """The random Mixtral-shaped checkpoint (bf16), written once, with SmolLM2's tokenizer."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from surgery.models.builtin import smollm2_folder

    torch.manual_seed(0)
    config = MixtralConfig(**SHAPE, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    tokenizer = smollm2_folder(progress=lambda *_: None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgery-moe-scale"))
    parser.add_argument("--before", type=Path, default=None, help="another checkout to run the same commands from")
    parser.add_argument("--json", default=str(REPO / "bench-results" / "moe-scale.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = random_mixtral(args.work / "mixtral-random")
    checkpoint_gb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
    print(f"random Mixtral shape: {checkpoint_gb:.2f} GB of bf16 safetensors")
    # "now" is the installed surgery (this checkout, installed as the README says).
    checkouts: dict[str, Path | None] = {"now": None, **({"before": args.before.resolve()} if args.before else {})}
    if args.before:
        for package in ("passes", "grammar"):
            link = args.before.resolve() / "surgery" / package
            if not link.exists():
                link.symlink_to(Path("..") / package)
    os.chdir(args.work)  # `python -m` puts the current folder first on the path
    os.environ.pop("PYTHONPATH", None)
    (args.work / "warm-up.surg").write_text(f'model "{model}"\nexport onnx\n')
    measure([sys.executable, "-m", "surgery", "apply", "warm-up.surg", "-o", "warm-up", "--force", "--no-verify"])
    shutil.rmtree(args.work / "warm-up", ignore_errors=True)
    runs = []
    for label, (text, flags) in RECIPES.items():
        recipe = args.work / "recipe.surg"
        recipe.write_text(f'model "{model}"\n' + text)
        for version, checkout in checkouts.items():
            out = args.work / "out"
            shutil.rmtree(out, ignore_errors=True)
            if checkout is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = str(checkout)
            command = [sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), *flags]
            record = {"recipe": label, "version": version, **measure(command)}
            report = json.loads((out / "surgery.json").read_text())
            record["output_gb"] = round(sum(f.stat().st_size for f in out.iterdir()) / 1e9, 3)
            record["verified"] = report.get("verification", {}).get("passed")
            runs.append(record)
            print(f"  {record}", flush=True)
    print(f"\n{'recipe':30} {'version':8} {'wall s':>8} {'peak GB':>8} {'output GB':>10} {'verified':>9}")
    for r in runs:
        print(f"{r['recipe']:30} {r['version']:8} {r['seconds']:>8.1f} {r['peak_gb']:>8.2f} {r['output_gb']:>10.2f} "
              f"{str(r['verified']):>9}")  # fmt: skip
    write_result(args.json, {"model": SHAPE, "checkpoint_gb": round(checkpoint_gb, 2), "runs": runs})


if __name__ == "__main__":
    main()
