"""Study: where an int4 KV cache loses on SmolLM2-135M, keys or values, and whether a Hadamard
rotation (QuaRot's trick) brings it back, in PyTorch on the calibrated per-channel scales that
`quantize kv-cache` writes.

onnxruntime's GroupQueryAttention takes one `kv_cache_bit_width` for keys and values and one
static scale per channel (or per tensor), so what can be changed is the basis the cache is
stored in. Two rotations are exact in float:
- values: v' = v H per head, folded into the weights (v_proj's rows by H^T, o_proj's columns by
  H), so the graph is unchanged;
- keys: q' = q H and k' = k H after RoPE (q'.k' = q.k); this needs RoPE outside the attention
  kernel and a MatMul per head, a graph change.

Rows: fp cache; int8 keys and values; int4 keys and values; int4 keys only; int4 values only;
int8 keys with int4 values (which onnxruntime cannot store: one bit width for both); int4 keys
rotated; int4 values rotated; and the package's `quantize kv-cache to int4 pre-rope` (keys
quantized before RoPE with a per-channel offset, run by the package's own attention).
`--int8-key-layers` keeps the keys of some layers at int8 in the int4-keys rows. Perplexity in
PyTorch on `--windows` windows of `--window` tokens of WikiText-2 test (one forward a window
from an empty cache), calibration 32 x 256 tokens of WikiText-2 valid (the recipes' default
protocol). This script replaces
`Attention.forward` for the study (the rotation of keys and a width per side are not package
features); the quantization is the package's (`kv_quantizations`, `KVCacheFormat.fake_quantize`).

    python benchmarks/study_kv_int4.py [--window 2048] [--windows 2] [--only TEXT ...] [--folder DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result  # noqa: E402

# name -> (rotate values, rotate keys, key bits, value bits); None: that side stays float
ROWS = {
    "fp cache": (False, False, None, None),
    "int8 keys and values": (False, False, 8, 8),
    "int4 keys and values": (False, False, 4, 4),
    "int4 keys only": (False, False, 4, None),
    "int4 values only": (False, False, None, 4),
    "int8 keys, int4 values": (False, False, 8, 4),
    "int4 keys, rotated after RoPE": (False, True, 4, None),
    "int4 values, rotated (weights)": (True, False, None, 4),
    # The package's `pre-rope` layout (keys before RoPE with a per-channel offset), its own forward.
    "int4 pre-rope keys and values": (False, False, "pre-rope", "pre-rope"),
}


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order `n` (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rotate_values(graph) -> None:
    """v' = v H in every layer, exactly: v_proj's rows of each KV head by H^T, o_proj's input
    columns of each head by H (attention's output per head is then P v H)."""
    for layer in graph.layers:
        a = layer.attention
        d, kv_heads, heads = a.head_dim, a.num_kv_heads, a.num_heads
        h = hadamard(d)
        wv = a.v_proj.weight.data.view(kv_heads, d, -1)
        a.v_proj.weight.data = torch.einsum("ed,hdi->hei", h.T, wv).reshape(kv_heads * d, -1).contiguous()
        if a.v_proj.bias is not None:
            a.v_proj.bias.data = (a.v_proj.bias.data.view(kv_heads, d) @ h).reshape(-1)
        wo = a.o_proj.weight.data.view(-1, heads, d)
        a.o_proj.weight.data = torch.einsum("ohd,de->ohe", wo, h).reshape(-1, heads * d).contiguous()


def study_forward(mode: dict):
    """An `Attention.forward` for plain RoPE attention (SmolLM2's) whose keys and values are read
    back at `mode`'s widths, the keys (and queries) optionally rotated after RoPE."""
    from surgery.formats.kv_cache import KVCacheFormat
    from surgery.nodes.attention import Attention, apply_rotary

    package = Attention.forward

    def forward(self, x, cos_sin, mask, cache=None):
        if mode["package"]:
            return package(self, x, cos_sin, mask, cache)
        q, k, v = self.heads(x)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rotated = cos.shape[-1]
        if mode["rotate_keys"]:
            h = hadamard(self.head_dim)
            q, k, rotated = q @ h, k @ h, 0  # channels are no longer RoPE pairs
        if self.observe is not None:
            self.observe(k, v, rotated, False)
        if self.kv_quant is not None:
            scales = self.kv_quant
            if mode["key_bits"]:
                bits = 8 if self.study_layer in mode["int8_key_layers"] else mode["key_bits"]
                k = KVCacheFormat(bits).fake_quantize(k, scales.k_scale[bits])
            if mode["value_bits"]:
                v = KVCacheFormat(mode["value_bits"]).fake_quantize(v, scales.v_scale[mode["value_bits"]])
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling + mask
        probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
        return self.output(torch.matmul(probs, v))

    return forward


def perplexity(graph, ids: torch.Tensor, window: int, windows: int) -> float:
    """exp(mean NLL) over `windows` windows of `window` tokens, each from an empty context."""
    nll, count = 0.0, 0
    for w in range(windows):
        piece = ids[w * window:(w + 1) * window][None]
        logits = graph.forward(piece, torch.ones_like(piece), torch.arange(window)[None])
        logp = torch.log_softmax(logits[0, :-1].float(), -1)
        nll -= logp.gather(1, piece[0, 1:, None]).sum().item()
        count += window - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT", help="only rows whose name has one")
    parser.add_argument("--int8-key-layers", type=int, nargs="*", default=[], metavar="LAYER",
                        help="keys stay int8 in these layers (the int4-keys rows)")  # fmt: skip
    parser.add_argument("--folder", default=None, help="a Hugging Face folder to study (default: SmolLM2-135M)")
    parser.add_argument("--json", default=str(REPO / "bench-results" / "kv-int4-study-smollm2.json"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.analysis.kv_calibration import kv_quantizations
    from surgery.calibration import CalibrationSpec, calibration_tokens, tokenize_text
    from surgery.data import resolve_text
    from surgery.formats.kv_cache import KVCacheFormat, KVQuantization
    from surgery.ir.graph import DecoderGraph
    from surgery.models.builtin import smollm2_folder
    from surgery.models.index import ModelIndex
    from surgery.nodes.attention import Attention

    folder = args.folder or smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = calibration_tokens(tokenizer, CalibrationSpec(samples=32, length=256))
    test = torch.from_numpy(tokenize_text(tokenizer, resolve_text("wikitext-2-test").read())).long()
    mode: dict = {}
    Attention.forward = study_forward(mode)  # this process only: the study's attention
    rows = {}
    chosen = {name: row for name, row in ROWS.items()
              if name == "fp cache" or not args.only or any(text in name for text in args.only)}  # fmt: skip
    for name, (rotate_v, rotate_k, key_bits, value_bits) in chosen.items():
        started = time.perf_counter()
        mode.update(rotate_keys=rotate_k, key_bits=None, value_bits=None, int8_key_layers=set(args.int8_key_layers),
                    package=key_bits == "pre-rope")  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        graph = DecoderGraph(model, ModelIndex.from_config(Path(folder).name, model.config))
        if rotate_v:
            rotate_values(graph)
        if mode["package"]:
            every = dict.fromkeys((layer.index for layer in graph.layers), KVCacheFormat.of(4, "pre-rope"))
            for index, quant in kv_quantizations(graph, every, calibration).items():
                graph.layer(index).attention.kv_quant = quant
            key_bits = value_bits = None
        if key_bits or value_bits:
            every = [layer.index for layer in graph.layers]
            widths = {key_bits, value_bits} - {None} | ({8} if key_bits and args.int8_key_layers else set())
            scales = {bits: kv_quantizations(graph, dict.fromkeys(every, KVCacheFormat(bits)), calibration)
                      for bits in widths}  # fmt: skip
            for layer in graph.layers:  # the scales of each width, looked up by the forward above
                layer.attention.study_layer = layer.index
                layer.attention.kv_quant = KVQuantization(
                    KVCacheFormat(4), {b: s[layer.index].k_scale for b, s in scales.items()},
                    {b: s[layer.index].v_scale for b, s in scales.items()})  # fmt: skip
        mode.update(key_bits=key_bits, value_bits=value_bits)
        rows[name] = {"perplexity": round(perplexity(graph, test, args.window, args.windows), 4),
                      "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        print(f"{name:34} {rows[name]['perplexity']:9.4f}", flush=True)
    fp = rows["fp cache"]["perplexity"]
    print(f"\n{Path(folder).name}, {args.windows} windows of {args.window} tokens of WikiText-2 test, PyTorch\n")
    print(f"{'cache':34} {'perplexity':>10} {'vs fp':>8}")
    for name, row in rows.items():
        row["vs_fp"] = round(row["perplexity"] / fp - 1, 4)
        print(f"{name:34} {row['perplexity']:10.4f} {row['vs_fp']:>+8.2%}")
    write_result(args.json, {"model": Path(folder).name, "window": args.window, "windows": args.windows,
                             "calibration": "wikitext-2-valid 32 x 256", "int8_key_layers": args.int8_key_layers,
                             "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
