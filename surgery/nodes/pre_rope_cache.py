"""Attention over a `pre-rope` KV cache, emitted as plain ONNX operators.

onnxruntime's GroupQueryAttention stores keys after RoPE with one symmetric scale per channel;
a `pre-rope` cache (surgery/formats/kv_cache.py) stores them before RoPE with a per-channel
offset, which no fused kernel reads. So a layer with one is emitted as its own small graph:

- the new keys and values, as (batch, kv_heads, seq, head_dim) in float32, are rounded to
  codes, (x - base) / scale, and int4 codes are packed two a byte (channel i with i + d/2);
- present = Concat(past, new codes) along the sequence, as the decoder's other caches grow;
- the whole present is read back as codes (int4 unpacked on the bytes); the keys are
  dequantized (codes * scale + base) and rotated by RoPE at their slots 0..T-1
  (`RotaryEmbedding`, com.microsoft, on the (batch, heads, T, d) layout);
- the queries are rotated at slots past..T-1: the index in the padded sequence, the same
  convention GroupQueryAttention uses (RoPE attention depends only on position differences,
  so a left-padded row gets the logits of its true positions);
- grouped-head attention: scaled Q K^T (`FusedMatMul`), soft-capping, a causal, padding and
  sliding-window mask, an fp32 softmax, and the weighted values (the value codes are weighted
  first and scaled after: each row of probabilities sums to 1).

Every decode step therefore reads the whole cache back and rotates its keys again: decode is
slower than GroupQueryAttention's fused kernel at long contexts (docs/benchmarks.md measures by
how much), and the cache is 4x smaller than fp16 at int4 with Qwen2's biased keys intact.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from surgery.nodes.context import MS, EmitContext

FLOAT, UINT8 = TensorProto.FLOAT, TensorProto.UINT8


def emit_pre_rope_attention(
    node, e: EmitContext, qkv: tuple[str, str, str], name: str, shared, slot: int, positions: bool
) -> str:
    """Attention of `node` (an `Attention` with a `pre-rope` cache) over its cache in slot
    `slot`: (batch, seq, heads * head_dim) from the split, unrotated Q, K and V (`qkv`), rotated
    here where the layer has `positions` (not a NoPE layer)."""
    q, k, v = qkv
    w, c = e.w, e.w.constant
    quant, fmt = node.kv_quant, node.kv_quant.format
    head_dim, kv_heads, heads = node.head_dim, node.num_kv_heads, node.num_heads
    groups = heads // kv_heads
    wide = e.onnx_type != FLOAT  # the cache arithmetic is float32 whatever the element type

    def initializer(kind: str, tensor) -> str:
        return w.weight(f"{name}.{kind}", tensor.detach().float().cpu().numpy(), parameter=False)

    def new_codes(x: str, scale: str, base: str, label: str) -> str:
        x = w.op("Reshape", [x, c([0, 0, kv_heads, head_dim])], f"/{name}/{label}_heads")
        x = w.op("Transpose", [x], f"/{name}/{label}_bnsh", perm=[0, 2, 1, 3])
        if wide:
            x = w.op("Cast", [x], f"/{name}/{label}_float", to=FLOAT)
        x = w.op("Div", [w.op("Sub", [x, base], f"/{name}/{label}_offset"), scale], f"/{name}/{label}_scaled")
        x = w.op("Round", [x], f"/{name}/{label}_round")
        x = w.op("Clip", [x, c(0.0, np.float32), c(float(fmt.levels), np.float32)], f"/{name}/{label}_clip")
        if fmt.bits == 4:  # channel i in the low nibble, i + d/2 in the high one
            low, high = w.node("Split", [x], f"/{name}/{label}_halves", 2, axis=-1, num_outputs=2)
            high = w.op("Mul", [high, c(16.0, np.float32)], f"/{name}/{label}_high")
            x = w.op("Add", [low, high], f"/{name}/{label}_pack")
        return w.op("Cast", [x], f"/{name}/{label}_codes", to=UINT8)

    def read(present: str, label: str) -> str:
        """The codes of the whole present as float32."""
        x = present
        if fmt.bits == 4:  # unpacked on the bytes (a quarter of the float traffic), then one Cast
            low = w.op("BitwiseAnd", [x, c(15, np.uint8)], f"/{name}/{label}_low_read")
            high = w.op("BitShift", [x, c(4, np.uint8)], f"/{name}/{label}_high_read", direction="RIGHT")
            x = w.op("Concat", [low, high], f"/{name}/{label}_unpack", axis=-1)
        return w.op("Cast", [x], f"/{name}/{label}_read", to=FLOAT)

    def dequantize(x: str, scale: str, base: str, label: str) -> str:
        return w.op("Add", [w.op("Mul", [x, scale], f"/{name}/{label}_times_scale"), base], f"/{name}/{label}_dequant")

    k_scale, v_scale = initializer("k_scale", quant.k_scale), initializer("v_scale", quant.v_scale)
    k_base, v_base = initializer("k_base", quant.k_base), initializer("v_base", quant.v_base)
    codes = []
    for kind, x, scale, base in (("key", k, k_scale, k_base), ("value", v, v_scale, v_base)):
        present = w.node("Concat", [f"past_key_values.{slot}.{kind}", new_codes(x, scale, base, kind)],
                         f"/{name}/{kind}_append", [f"present.{slot}.{kind}"], axis=2)[0]  # fmt: skip
        codes.append(read(present, kind))  # (batch, kv_heads, total, head_dim)
    keys = dequantize(codes[0], k_scale, k_base, "key")  # unrotated
    if wide:
        keys = w.op("Cast", [keys], f"/{name}/key_element", to=e.onnx_type)

    if positions:
        cos, sin = shared.rotary(node.rope)
        rotated = shared.rotary_dim(node.rope)
        partial = {"rotary_embedding_dim": rotated} if rotated < head_dim else {}
        turn = {"interleaved": int(node.rope_interleaved), **partial}
        # RotaryEmbedding takes (batch, heads, seq, d) as it is, and a one-element position is
        # the first slot's: the cached keys from slot 0, the new queries from the past length.
        keys = w.op("RotaryEmbedding", [keys, c([0]), cos, sin], f"/{name}/k_rotary", MS, num_heads=kv_heads, **turn)
        q = w.op("RotaryEmbedding", [q, shared.past_length(), cos, sin], f"/{name}/q_rotary", MS,
                 num_heads=heads, **turn)  # fmt: skip

    # Grouped heads: query head h reads key/value head h // groups, as (batch, kv_heads, groups * seq, d).
    q = w.op("Reshape", [q, c([0, 0, kv_heads, groups, head_dim])], f"/{name}/q_groups")
    q = w.op("Transpose", [q], f"/{name}/q_grouped", perm=[0, 2, 3, 1, 4])
    q = w.op("Reshape", [q, c([0, 0, -1, head_dim])], f"/{name}/q_rows")
    scores = w.op("FusedMatMul", [q, keys], f"/{name}/scores", MS, transA=0, transB=1, alpha=float(node.scaling))
    if wide:
        scores = w.op("Cast", [scores], f"/{name}/scores_float", to=FLOAT)
    if node.softcap is not None:
        cap = c(float(node.softcap), np.float32)
        scores = w.op("Mul", [w.op("Tanh", [w.op("Div", [scores, cap], f"/{name}/capped")], f"/{name}/tanh"), cap],
                      f"/{name}/softcap")  # fmt: skip
    scores = w.op("Add", [scores, shared.causal_bias(node.sliding_window, groups)], f"/{name}/masked")
    probs = w.op("Softmax", [scores], f"/{name}/probs", axis=-1)
    # Each row of probs sums to 1, so probs (codes * s + b) = (probs codes) * s + b: the values
    # are scaled after the weighted sum, on (batch, kv_heads, groups * seq, d), not the whole cache.
    out = w.op("MatMul", [probs, codes[1]], f"/{name}/attended_codes")
    out = dequantize(out, v_scale, v_base, "attended")  # (batch, kv_heads, groups * seq, d)
    if wide:
        out = w.op("Cast", [out], f"/{name}/attended_element", to=e.onnx_type)
    out = w.op("Reshape", [out, c([0, 0, groups, -1, head_dim])], f"/{name}/out_groups")
    out = w.op("Transpose", [out], f"/{name}/out_bsnh", perm=[0, 3, 1, 2, 4])
    return w.op("Reshape", [out, c([0, 0, heads * head_dim])], f"/{name}/output")
