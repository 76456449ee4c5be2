"""onnxruntime's GroupQueryAttention with an int8 KV cache on the CPU and CUDA providers: what each
reads at a prefill (empty past) and at a decode step with a growing past (not shared with present),
against attention over the float and over the dequantized keys and values. Prints max differences.

    python benchmarks/gqa_cuda_semantics.py   (on the GPU machine; ../shared/docs/gpu.md)

Measured on an H100 with onnxruntime-gpu 1.31.1: the CPU reads the rounded keys and values in both
steps (differences 1e-3, fp16); CUDA reads the float ones at the prefill and is off by 2.4 at the
decode step against either reference. docs/recipes.md (quantize kv-cache) says what follows.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as oh

BATCH, PROMPT, HEADS, KV_HEADS, HEAD_DIM = 1, 6, 4, 2, 64
SCALE = 0.02


def model(per_channel: bool):
    """One GroupQueryAttention node over fp16 inputs with an int8 cache and constant scales."""
    f16, i8 = TensorProto.FLOAT16, TensorProto.INT8
    inputs = [oh.make_tensor_value_info("q", f16, [BATCH, "s", HEADS * HEAD_DIM]),
              oh.make_tensor_value_info("k", f16, [BATCH, "s", KV_HEADS * HEAD_DIM]),
              oh.make_tensor_value_info("v", f16, [BATCH, "s", KV_HEADS * HEAD_DIM]),
              oh.make_tensor_value_info("pk", i8, [BATCH, KV_HEADS, "p", HEAD_DIM]),
              oh.make_tensor_value_info("pv", i8, [BATCH, KV_HEADS, "p", HEAD_DIM]),
              oh.make_tensor_value_info("sk", TensorProto.INT32, [BATCH]),
              oh.make_tensor_value_info("tl", TensorProto.INT32, [])]  # fmt: skip
    shape = [1, KV_HEADS, 1, HEAD_DIM] if per_channel else [1]
    values = np.full(shape, SCALE, np.float32).ravel()
    scales = [oh.make_tensor(name, TensorProto.FLOAT, shape, values) for name in ("ks", "vs")]
    kind = "PER_CHANNEL" if per_channel else "PER_TENSOR"
    node = oh.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sk", "tl", "", "", "", "", "", "ks", "vs"],
                        ["o", "pk_out", "pv_out"], domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
                        k_quant_type=kind, v_quant_type=kind, kv_cache_bit_width=8)  # fmt: skip
    outputs = [oh.make_tensor_value_info("o", f16, None), oh.make_tensor_value_info("pk_out", i8, None),
               oh.make_tensor_value_info("pv_out", i8, None)]  # fmt: skip
    graph = oh.make_graph([node], "gqa", inputs, outputs, scales)
    built = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])
    built.ir_version = 10  # onnxruntime 1.31 reads IR 10
    return built.SerializeToString()


def attention(q, k, v):
    """Causal grouped-query attention of the last q positions over every k, v position (float32)."""
    s, t = q.shape[1], k.shape[1]
    qh = q[0].astype(np.float32).reshape(s, HEADS, HEAD_DIM).transpose(1, 0, 2)
    kh = np.repeat(k[0].astype(np.float32).reshape(t, KV_HEADS, HEAD_DIM).transpose(1, 0, 2), HEADS // KV_HEADS, 0)
    vh = np.repeat(v[0].astype(np.float32).reshape(t, KV_HEADS, HEAD_DIM).transpose(1, 0, 2), HEADS // KV_HEADS, 0)
    scores = qh @ kh.transpose(0, 2, 1) / np.sqrt(HEAD_DIM) + np.triu(np.full((s, t), -1e9), 1 + t - s)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ vh).transpose(1, 0, 2).reshape(1, s, HEADS * HEAD_DIM)


def rounded(x):
    """What a symmetric int8 cache with the constant scale holds, dequantized."""
    return np.clip(np.round(x.astype(np.float32) / SCALE), -128, 127) * SCALE


def main() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((BATCH, PROMPT + 1, n * HEAD_DIM)).astype(np.float16)
               for n in (HEADS, KV_HEADS, KV_HEADS))  # fmt: skip
    for per_channel in (False, True):
        for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            if provider not in ort.get_available_providers():
                continue
            session = ort.InferenceSession(model(per_channel), providers=[provider])
            empty = np.zeros((BATCH, KV_HEADS, 0, HEAD_DIM), np.int8)
            out, keys, values = session.run(None, {
                "q": q[:, :PROMPT], "k": k[:, :PROMPT], "v": v[:, :PROMPT], "pk": empty, "pv": empty,
                "sk": np.array([PROMPT - 1], np.int32), "tl": np.array(PROMPT, np.int32)})  # fmt: skip
            step, _, _ = session.run(None, {
                "q": q[:, PROMPT:], "k": k[:, PROMPT:], "v": v[:, PROMPT:], "pk": keys, "pv": values,
                "sk": np.array([PROMPT], np.int32), "tl": np.array(PROMPT + 1, np.int32)})  # fmt: skip
            prefill = [np.abs(out - attention(q[:, :PROMPT], a, b)).max()
                       for a, b in ((k[:, :PROMPT], v[:, :PROMPT]), (rounded(k[:, :PROMPT]), rounded(v[:, :PROMPT])))]
            decode = [np.abs(step - attention(q[:, PROMPT:], a, b)).max()
                      for a, b in ((k, v), (rounded(k), rounded(v)))]  # fmt: skip
            print(f"{'per-channel' if per_channel else 'per-tensor'} {provider}: prefill vs float {prefill[0]:.4f}, "
                  f"vs rounded {prefill[1]:.4f}; decode vs float {decode[0]:.4f}, vs rounded {decode[1]:.4f}")


if __name__ == "__main__":
    main()
