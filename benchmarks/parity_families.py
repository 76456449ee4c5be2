"""Every family on its tiny random model: ONNX against the Hugging Face model itself.

For each built-in tiny model, unmodified and after each drop pass (attention, MLP, block in
layers 1 and 4), with and without the KV cache: the max |logit diff| between onnxruntime and
the Hugging Face forward (its own cache for the unmodified model; a full recompute for edited
ones) over the verification protocol (2 left-padded prompts, prefill + 8 decode steps). Also
the line count of each family's declaration.

    python benchmarks/parity_families.py [--only tiny-llama ...] [--json bench-results/parity-families.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result  # noqa: E402

from surgery import architectures  # noqa: E402
from surgery.architectures.hf_reference import HuggingFaceForward, edit_like_graph  # noqa: E402
from surgery.backend.verify import compare, trace_reference  # noqa: E402
from surgery.export.decoder import export_decoder  # noqa: E402
from surgery.export.options import ExportOptions  # noqa: E402
from surgery.front.planner import VERIFY_DECODE_STEPS  # noqa: E402
from surgery.ir.graph import DecoderGraph  # noqa: E402
from surgery.models import builtin  # noqa: E402
from surgery.models.index import ModelIndex  # noqa: E402
from surgery.passes import DropAttention, DropBlock, DropMlp, run_pass  # noqa: E402

EDITS = {"none": None, "attention": DropAttention, "mlp": DropMlp, "block": DropBlock}


def max_diff(name: str, edit: str, kv_cache: bool) -> float:
    """Max |logit diff| of one export against the Hugging Face model."""
    model = builtin.tiny_model(name)
    graph = DecoderGraph(model, ModelIndex.from_config(name, model.config))
    if EDITS[edit] is not None:
        run_pass(EDITS[edit](layers=(1, 4)), graph)
        edit_like_graph(model, edit, (1, 4))
    with tempfile.TemporaryDirectory() as folder:
        export_decoder(graph, folder, ExportOptions(kv_cache=kv_cache))
        hf_cache = kv_cache and edit == "none"
        trace = trace_reference(HuggingFaceForward(model), builtin.byte_tokenizer(), hf_cache, VERIFY_DECODE_STEPS)
        check = compare(dataclasses.replace(trace, kv_cache=kv_cache), folder, 1e-4, threads=1)
    return check.max_abs_logit_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench-results" / "parity-families.json"))
    parser.add_argument("--only", nargs="+", default=None, help="these tiny models only (default: every one)")
    args = parser.parse_args()
    rows = {}
    print(f"{'model':16} {'family':12} {'lines':>5}  " + "  ".join(f"{e + ' kv/full':>20}" for e in EDITS))
    for name, tiny in builtin.TINY_MODELS.items():
        if args.only and name not in args.only:
            continue
        arch = architectures.lookup(tiny.architecture)
        declaration = next(
            p for p in (REPO / "surgery" / "architectures").glob("*.py")
            if f'"{arch.model_type}"' in p.read_text() and p.stem not in ("__init__", "description")
        )  # fmt: skip
        lines = len(declaration.read_text().splitlines())
        diffs = {f"{e}/{'kv' if kv else 'full'}": max_diff(name, e, kv) for e in EDITS for kv in (True, False)}
        rows[name] = {"family": arch.model_type, "declaration": declaration.name, "lines": lines, "max_abs_diff": diffs}
        cells = "  ".join(f"{diffs[e + '/kv']:9.1e} {diffs[e + '/full']:9.1e}" for e in EDITS)
        print(f"{name:16} {arch.model_type:12} {lines:5d}  {cells}", flush=True)
    write_result(args.json, {"protocol": "ONNX vs Hugging Face, 2 left-padded prompts + 8 decode steps", "rows": rows})


if __name__ == "__main__":
    main()
