"""Multi-head latent attention (DeepSeek-V2/V3), exported with its compressed latent as the cache.

DeepSeek's attention caches per token one latent `c` (kv_lora_rank wide, RMS-normalized) and one
shared rotary key `k_pe` (qk_rope_head_dim); each head's key and value are `c` expanded by
`kv_b_proj`. Exporting the expanded keys and values would cache heads x (nope + rope + v) numbers
per token and lose the point of the design. Instead the expansion is absorbed into the query and
the output (the form DeepSeek's own inference uses):

- a head's score `q_nope . (W_UK c) + q_pe . k_pe` equals `(W_UK^T q_nope) . c + q_pe . k_pe`, so
  the query becomes `[q_pe, W_UK^T q_nope]` per head and the key `[k_pe, c]`: one key head of
  rope + kv_lora_rank, shared by every query head (grouped-query attention with one KV head);
- the value is that same `[k_pe, c]`; attention's output per head, past its first rope
  dimensions, is the probability-weighted `c`, and `W_UV` turns it into the head's value.

So onnxruntime's GroupQueryAttention runs it unchanged: one KV head whose first rope dimensions
it rotates (partial, interleaved RoPE), the cache holding `[k_pe, c]` as both key and value. Per
token and layer that is 2 x (rope + kv_lora_rank) numbers against heads x (nope + rope + v) for a
plain-attention export (DeepSeek-V2-Lite: 1,152 against 5,120).
"""

from __future__ import annotations

import torch

from surgery.nodes.attention import Attention
from surgery.nodes.context import EmitContext
from surgery.nodes.linear import emit_linear
from surgery.nodes.norm import RMSNorm


class LatentAttention(Attention):
    """One layer's multi-head latent attention, as GroupQueryAttention over the latent (see above).

    `q_proj` is the query projection, or None with `q_a_proj`, `q_a_norm`, `q_b_proj` (a
    low-rank query, DeepSeek-V2); `kv_a_proj` gives [c, k_pe]; `kv_b_proj` holds each head's
    W_UK and W_UV rows.
    """

    def __init__(self, q_proj, q_a_proj, q_a_norm: RMSNorm | None, q_b_proj, kv_a_proj, kv_a_norm: RMSNorm,
                 kv_b_proj, o_proj, num_heads: int, nope: int, rope_dim: int, value_dim: int, rank: int,
                 scaling: float, rope: str | None = None):  # fmt: skip
        super().__init__(q_proj, kv_a_proj, kv_a_proj, o_proj, num_heads=num_heads, num_kv_heads=1,
                         head_dim=rope_dim + rank, scaling=scaling, rope=rope, rope_interleaved=True)  # fmt: skip
        self.q_a_proj, self.q_a_norm, self.q_b_proj = q_a_proj, q_a_norm, q_b_proj
        self.kv_a_proj, self.kv_a_norm, self.kv_b_proj = kv_a_proj, kv_a_norm, kv_b_proj
        self.nope, self.rope_dim, self.value_dim, self.rank = nope, rope_dim, value_dim, rank

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK as (heads, nope, rank), W_UV as (heads, rank, value)) viewed from kv_b_proj."""
        per_head = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.value_dim, self.rank)
        return per_head[:, : self.nope], per_head[:, self.nope :].transpose(1, 2)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [q_pe, W_UK^T q_nope] per head and the one key and value head [k_pe, c]."""
        batch, seq, _ = x.shape
        q = self._query(x).view(batch, seq, self.num_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        w_uk, _ = self._absorbed()
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk.to(q_nope.dtype))
        q = torch.cat([q_pe, q_latent], -1).transpose(1, 2)
        latent, k_pe = self.kv_a_proj(x).split([self.rank, self.rope_dim], dim=-1)
        k = torch.cat([k_pe, self.kv_a_norm(latent)], -1).view(batch, seq, 1, self.head_dim).transpose(1, 2)
        return q, k, k

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """Each head's weighted latent (past its rope dimensions) through W_UV, then o_proj."""
        batch, _, seq, _ = attended.shape
        _, w_uv = self._absorbed()
        values = torch.einsum("bhsc,hcv->bshv", attended[..., self.rope_dim :], w_uv.to(attended.dtype))
        return self.o_proj(values.reshape(batch, seq, -1))

    # ONNX

    def emit_heads(self, e: EmitContext, x: str, name: str, split: bool) -> tuple[str, str, str]:
        """The query and the latent key as (batch, seq, heads * (rope + rank)) and (batch, seq, rope
        + rank); the key is also the value."""
        w, c = e.w, e.w.constant
        if self.q_proj is not None:
            q = emit_linear(e, self.q_proj, x, f"{name}.q_proj")
        else:
            low = emit_linear(e, self.q_a_proj, x, f"{name}.q_a_proj")
            q = emit_linear(e, self.q_b_proj, self.q_a_norm.emit(e, low, f"/{name}/q_a_norm"), f"{name}.q_b_proj")
        q = w.op("Reshape", [q, c([0, 0, self.num_heads, self.nope + self.rope_dim])], f"/{name}/q_heads")
        q_nope, q_pe = w.node("Split", [q, c([self.nope, self.rope_dim])], f"/{name}/q_split", 2, axis=-1)
        w_uk, w_uv = self._absorbed()
        nope_first = w.op("Transpose", [q_nope], f"/{name}/q_nope_T", perm=[0, 2, 1, 3])  # (batch, heads, seq, nope)
        latent = w.op("MatMul", [nope_first, w.weight(f"{name}.w_uk", e.array(w_uk))], f"/{name}/absorb_uk")
        latent = w.op("Transpose", [latent], f"/{name}/q_latent", perm=[0, 2, 1, 3])
        q = w.op("Concat", [q_pe, latent], f"/{name}/q_concat", axis=-1)
        q = w.op("Reshape", [q, c([0, 0, -1])], f"/{name}/q")
        kv = emit_linear(e, self.kv_a_proj, x, f"{name}.kv_a_proj")
        latent_kv, k_pe = w.node("Split", [kv, c([self.rank, self.rope_dim])], f"/{name}/kv_split", 2, axis=-1)
        k = w.op("Concat", [k_pe, self.kv_a_norm.emit(e, latent_kv, f"/{name}/kv_a_norm")], f"/{name}/k", axis=-1)
        return q, k, k

    def emit_output(self, e: EmitContext, attended: str, name: str) -> str:
        """Drop each head's rope dimensions, W_UV per head, then o_proj."""
        w, c = e.w, e.w.constant
        _, w_uv = self._absorbed()
        heads = w.op("Reshape", [attended, c([0, 0, self.num_heads, self.head_dim])], f"/{name}/out_heads")
        latent = w.op("Slice", [heads, c([self.rope_dim]), c([self.head_dim]), c([-1])], f"/{name}/out_latent")
        latent = w.op("Transpose", [latent], f"/{name}/out_T", perm=[0, 2, 1, 3])  # (batch, heads, seq, rank)
        values = w.op("MatMul", [latent, w.weight(f"{name}.w_uv", e.array(w_uv))], f"/{name}/absorb_uv")
        values = w.op("Transpose", [values], f"/{name}/values_T", perm=[0, 2, 1, 3])
        values = w.op("Reshape", [values, c([0, 0, -1])], f"/{name}/values")
        return emit_linear(e, self.o_proj, values, f"{name}.o_proj")
