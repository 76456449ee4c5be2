"""Grouped-query attention with RoPE, as one node per layer, with its head counts.

PyTorch: the projections, optional Q/K norms and clipping, RoPE, the KV cache, scaled dot
products (optionally soft-capped), the additive mask and an fp32 softmax, as transformers'
eager attention computes them. ONNX: one packed QKV MatMul feeding onnxruntime's
GroupQueryAttention, which applies RoPE, appends the KV cache and attends with grouped heads
(see surgery/export/decoder.py for the padding and position conventions).

Family variants are settings of the node: RoPE on halves or on interleaved pairs (GLM, ERNIE,
DeepSeek; `rotary_interleaved`), over the whole head or its first dimensions, or none (NoPE
layers); per-head Q/K norms before RoPE or after it (HunYuan: RoPE is then applied by
RotaryEmbedding nodes at positions counted from the mask, before the norms); attention sinks
(gpt-oss: GroupQueryAttention's `head_sink`). `heads`/`output` and `emit_heads`/`emit_output`
are the projections on either side of attention, which multi-head latent attention replaces
(surgery/nodes/latent_attention.py).

A layer whose cache is quantized (`kv_quant`, set by `quantize kv-cache`) reads its keys and
values back rounded to its format's grid in PyTorch as GroupQueryAttention does in onnxruntime
(surgery/formats/kv_cache.py), and emits an int8 or packed int4 cache with its scales; a
`pre-rope` cache is quantized before RoPE and emitted by surgery/nodes/pre_rope_cache.py.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.formats.kv_cache import KVQuantization
from surgery.nodes.context import MS, EmitContext
from surgery.nodes.linear import emit_linear
from surgery.nodes.norm import RMSNorm
from surgery.nodes.pre_rope_cache import emit_pre_rope_attention

NO_ROPE = "no-rope"  # the rotary kind of a layer without positions (SmolLM3's NoPE layers)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(-x2, x1) for the two halves of the last axis."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(-x1, x0) for each adjacent pair (x0, x1) of the last axis: interleaved RoPE's rotation."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE on (batch, heads, seq, head_dim) with (batch, seq, rotary_dim) tables.

    The tables hold each frequency twice, in two halves. Interleaved RoPE (GLM, ERNIE 4.5) turns
    adjacent pairs (2i, 2i + 1) by frequency i instead of dimensions i and i + rotary_dim / 2.
    """
    cos, sin = cos[:, None], sin[:, None]
    rotate = rotate_half
    if interleaved:
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
        rotate = rotate_pairs
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate(x) * sin
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat([head * cos + rotate(head) * sin, tail], dim=-1)


class Attention(torch.nn.Module):
    """One layer's attention sub-block (without its norms, which the layer holds)."""

    def __init__(
        self,
        q_proj: torch.nn.Linear,
        k_proj: torch.nn.Linear,
        v_proj: torch.nn.Linear,
        o_proj: torch.nn.Linear,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
        qk_norm: str = "none",
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        softcap: float | None = None,
        clip: float | None = None,
        sliding_window: int | None = None,
        rope: str | None = None,
        rope_interleaved: bool = False,
        qk_norm_after_rope: bool = False,
        sinks: torch.nn.Parameter | None = None,
    ):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = float(scaling)
        self.qk_norm = qk_norm
        self.q_norm, self.k_norm = q_norm, k_norm
        self.softcap = softcap
        self.clip = clip
        self.sliding_window = sliding_window
        self.rope = rope  # which rotary table this layer reads
        self.rope_interleaved = rope_interleaved  # RoPE turns adjacent pairs (GLM), not halves
        self.qk_norm_after_rope = qk_norm_after_rope  # per-head Q/K norms on the rotated heads (HunYuan)
        # Attention sinks (gpt-oss): one learned logit per head that joins every softmax and takes
        # its share of the probability without a value, so a head can attend to nothing.
        self.sinks = sinks
        self.kv_quant: KVQuantization | None = None  # a quantized KV cache: its format and scales
        # Verification only: onnxruntime's cache codes, read instead of PyTorch's own rounding
        # (surgery.backend.verify_cache.CacheReadBack).
        self.kv_read_back = None
        # Called with (keys after RoPE, values, rotary dims, interleaved) before they are cached: the KV cache
        # calibration's statistics (surgery/analysis/kv_calibration.py).
        self.observe = None

    def forward(self, x: torch.Tensor, cos_sin, mask: torch.Tensor, cache=None) -> torch.Tensor:
        """Attention output (batch, seq, hidden) of the normalized residual x.

        `cache` is a `(KVCache, slot)` pair or None; `mask` is the additive (batch, 1, q, k) bias.
        """
        batch, seq, _ = x.shape
        q, k, v = self.heads(x)
        # A `pre-rope` cache stores (and calibration observes) the keys before they are rotated.
        before_rope = self.kv_quant is not None and self.kv_quant.format.before_rope
        if self.observe is not None and self.observe.before_rope:
            self.observe(k, v, 0, False)
        if before_rope:
            k, v = self._read_cache(k, v)
        rotated = 0
        if self.rope != NO_ROPE:
            cos, sin = cos_sin
            # Some families' tables stay fp32 (OLMo 2 rotates in fp32): back to the element type.
            turn = self.rope_interleaved
            q, k = apply_rotary(q, cos, sin, turn).to(x.dtype), apply_rotary(k, cos, sin, turn).to(x.dtype)
            rotated = cos.shape[-1]
        if self.qk_norm == "head" and self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.observe is not None and not self.observe.before_rope:
            self.observe(k, v, rotated, self.rope_interleaved)
        if self.kv_quant is not None and not before_rope:
            k, v = self._read_cache(k, v)
        if cache is not None:
            store, slot = cache
            k, v = store.append(slot, k, v)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores + mask
        if self.sinks is not None:
            sink = self.sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(batch, -1, seq, 1)
            probs = torch.softmax(torch.cat([scores, sink], -1), dim=-1, dtype=torch.float32)[..., :-1].to(q.dtype)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.output(torch.matmul(probs, v))

    def _read_cache(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads back from its quantized cache: PyTorch's rounding, or in
        verification onnxruntime's codes (checked against it)."""
        if self.kv_read_back is not None:
            return self.kv_read_back.take(self.kv_quant, k, v)
        return self.kv_quant.read_back(k, v)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K and V of x as (batch, heads, seq, head_dim), before RoPE: the projections, any Q/K
        norms that come before RoPE, and clipping."""
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head" and not self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """The sub-block's output from the attended values (batch, heads, seq, head_dim)."""
        batch, _, seq, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, seq, -1))

    # ONNX

    def emit(self, e: EmitContext, x: str, name: str, shared, slot: int) -> str:
        """Packed QKV MatMul -> (norms, clip, explicit RoPE) -> GroupQueryAttention -> o_proj.

        `shared` carries what every attention layer reads: seqlens_k, the total length, the
        padding bias, the rotary tables by kind and (with `position_ids`) the positions.
        """
        w = e.w
        positions = self.rope != NO_ROPE
        # RoPE by RotaryEmbedding nodes before attention: asked for, or needed because the Q/K
        # norms come after it (GroupQueryAttention rotates inside, after anything emitted here).
        explicit = e.options.position_ids or (self.qk_norm_after_rope and positions)
        norm_first = self.qk_norm != "none" and not self.qk_norm_after_rope
        own_cache = self.kv_quant is not None and not self.kv_quant.format.native  # a `pre-rope` cache
        split = self.qk_norm != "none" or explicit or self.clip is not None or own_cache
        q, k, v = self.emit_heads(e, x, name, split)
        if split:
            if norm_first:
                q = self._qk_norm(e, self.q_norm, q, f"{name}.q_norm")
                k = self._qk_norm(e, self.k_norm, k, f"{name}.k_norm")
            if self.clip is not None:
                bounds = [e.scalar(-self.clip), e.scalar(self.clip)]
                q, k, v = (w.op("Clip", [t, *bounds], f"/{name}/clip_{n}") for t, n in ((q, "q"), (k, "k"), (v, "v")))
        if own_cache:  # its own graph rotates keys read back from the cache (no Q/K norms after RoPE)
            return self.emit_output(e, emit_pre_rope_attention(self, e, (q, k, v), name, shared, slot, positions), name)
        cos, sin = shared.rotary(self.rope) if positions else ("", "")
        if explicit and positions:
            rotated = shared.rotary_dim(self.rope)
            # Partial rotary embeddings: RotaryEmbedding must be told (GroupQueryAttention reads the tables).
            partial = {"rotary_embedding_dim": rotated} if rotated < self.head_dim else {}
            ids = shared.positions()
            q = w.op("RotaryEmbedding", [q, ids, cos, sin], f"/{name}/q_rotary", MS,
                     interleaved=int(self.rope_interleaved), num_heads=self.num_heads, **partial)  # fmt: skip
            k = w.op("RotaryEmbedding", [k, ids, cos, sin], f"/{name}/k_rotary", MS,
                     interleaved=int(self.rope_interleaved), num_heads=self.num_kv_heads, **partial)  # fmt: skip
        if self.qk_norm != "none" and not norm_first:
            q = self._qk_norm(e, self.q_norm, q, f"{name}.q_norm")
            k = self._qk_norm(e, self.k_norm, k, f"{name}.k_norm")
        past_k = past_v = ""
        present = [f"/{name}/present_key", f"/{name}/present_value"]
        if e.options.kv_cache:
            past_k, past_v = f"past_key_values.{slot}.key", f"past_key_values.{slot}.value"
            present = [f"present.{slot}.key", f"present.{slot}.value"]
        rotary = ["", ""] if explicit or not positions else [cos, sin]
        inputs = [q, k, v, past_k, past_v, shared.seqlens_k, shared.total_len, *rotary, "", shared.bias]
        extra = {"softcap": float(self.softcap)} if self.softcap is not None else {}
        if self.sinks is not None:
            inputs.append(e.w.weight(f"{name}.sinks", e.array(self.sinks.detach().float())))  # head_sink
        if self.kv_quant is not None:
            if self.sinks is None:
                inputs.append("")  # head_sink
            inputs += self._kv_scales(e, name)  # k_scale, v_scale
            quant_type = self.kv_quant.format.quant_type
            extra |= {"k_quant_type": quant_type, "v_quant_type": quant_type,
                      "kv_cache_bit_width": self.kv_quant.format.bits}  # fmt: skip
        out = w.node(
            "GroupQueryAttention",
            inputs,
            f"/{name}/GroupQueryAttention",
            [f"/{name}/output", *present],
            MS,
            num_heads=self.num_heads,
            kv_num_heads=self.num_kv_heads,
            scale=self.scaling,
            # transformers lets query q see key k when q - k < window; this attribute counts alike.
            local_window_size=self.sliding_window if self.sliding_window else -1,
            do_rotary=0 if explicit or not positions else 1,
            rotary_interleaved=int(self.rope_interleaved),
            **extra,
        )[0]
        return self.emit_output(e, out, name)

    def emit_heads(self, e: EmitContext, x: str, name: str, split: bool) -> tuple[str, str, str]:
        """One packed QKV MatMul (and bias); split into Q, K and V where something comes between it
        and GroupQueryAttention, else (packed, "", ""), which GroupQueryAttention splits itself."""
        w = e.w
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        packed = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (q + 2 kv, hidden)
        qkv = e.linear(f"{name}.qkv_proj", x, packed, f"{name}.qkv_proj.weight", f"/{name}/qkv_proj/MatMul")
        del packed
        if self.q_proj.bias is not None:
            bias = np.concatenate([e.array(self.q_proj.bias), e.array(self.k_proj.bias), e.array(self.v_proj.bias)])
            qkv = w.op("Add", [qkv, w.weight(f"{name}.qkv_proj.bias", bias)], f"/{name}/qkv_proj/Add")
        if not split:
            return qkv, "", ""
        q, k, v = w.node("Split", [qkv, w.constant([q_size, kv_size, kv_size])], f"/{name}/qkv_split", 3, axis=-1)
        return q, k, v

    def emit_output(self, e: EmitContext, attended: str, name: str) -> str:
        """The sub-block's output from GroupQueryAttention's (batch, seq, heads * head_dim)."""
        return emit_linear(e, self.o_proj, attended, f"{name}.o_proj")

    def _kv_scales(self, e: EmitContext, name: str) -> list[str]:
        """The quantized cache's float32 scales, as initializers."""
        quant = self.kv_quant
        return [e.w.weight(f"{name}.{kind}", scale.detach().float().cpu().numpy(), parameter=False)
                for kind, scale in (("k_scale", quant.k_scale), ("v_scale", quant.v_scale))]  # fmt: skip

    def _qk_norm(self, e: EmitContext, norm: RMSNorm, x: str, name: str) -> str:
        """RMSNorm of a (batch, seq, heads * head_dim) tensor: per head, or over the whole projection."""
        if self.qk_norm == "projection":
            return norm.emit(e, x, f"/{name}/Norm", gamma=e.w.weight(f"{name}.weight", norm.gain(e)))
        w = e.w
        split = w.op("Reshape", [x, w.constant([0, 0, -1, self.head_dim])], f"/{name}/Reshape")
        normed = norm.emit(e, split, f"/{name}/Norm", gamma=w.weight(f"{name}.weight", norm.gain(e)))
        return w.op("Reshape", [normed, w.constant([0, 0, -1])], f"/{name}/Merge")
