"""What every attention layer of an export reads: sequence lengths, the total length, the padding
bias, positions, and the rotary cos/sin tables by RoPE kind (written once, on first use)."""

from __future__ import annotations

import numpy as np
from onnx import helper


class SharedInputs:
    """What every attention layer reads: lengths, padding bias, positions, rotary tables by kind."""

    def __init__(self, emitter):
        self.e = emitter
        self.seqlens_k = self.total_len = self.bias = self.position_ids = self.new_mask = ""
        self._tables: dict[str | None, tuple[str, str]] = {}
        self._dims: dict[str | None, int] = {}

    def rotary(self, kind: str | None) -> tuple[str, str]:
        """cos/sin cache names of one RoPE kind, written on first use."""
        if kind not in self._tables:
            self._tables[kind] = self._write(kind)
        return self._tables[kind]

    def positions(self) -> str:
        """Each new token's position: the `position_ids` input where the export has one, else
        counted from the attention mask (the non-padding tokens before it), once.

        GroupQueryAttention rotates by the index in the padded sequence, which is exact only where
        attention depends on position differences alone; a family that normalizes Q and K after
        RoPE (HunYuan) needs the true positions of left-padded rows.
        """
        if not self.position_ids:
            w, c, e = self.e.w, self.e.w.constant, self.e
            name = "/model/positions"
            counted = w.op("CumSum", [e.attention_mask, c(1)], f"{name}/CumSum")
            ids = w.op("Max", [w.op("Sub", [counted, c(1)], f"{name}/Sub"), c(0)], f"{name}/Max")
            seq = w.op("Gather", [w.op("Shape", [e.input_ids], f"{name}/ids_shape"), c([1])], f"{name}/seq")
            start = w.op("Neg", [seq], f"{name}/start")
            self.position_ids = w.op("Slice", [ids, start, c([np.iinfo(np.int64).max]), c([1])], f"{name}/Slice")
        return self.position_ids

    def new_token_mask(self) -> str:
        """The attention mask of the new tokens, as (batch, seq, 1) in the element type, once: a
        short convolution zeroes its padding positions' inputs with it, as transformers does."""
        if not self.new_mask:
            w, c, e = self.e.w, self.e.w.constant, self.e
            name = "/model/new_token_mask"
            seq = w.op("Gather", [w.op("Shape", [e.input_ids], f"{name}/ids_shape"), c([1])], f"{name}/seq")
            start = w.op("Neg", [seq], f"{name}/start")
            mask = w.op("Slice", [e.attention_mask, start, c([np.iinfo(np.int64).max]), c([1])], f"{name}/Slice")
            mask = w.op("Cast", [mask], f"{name}/Cast", to=e.onnx_type)
            self.new_mask = w.op("Unsqueeze", [mask, c([-1])], f"{name}/Unsqueeze")
        return self.new_mask

    def rotary_dim(self, kind: str | None) -> int:
        """How many dimensions of each head RoPE of this kind rotates (less than the head with
        partial rotary embeddings: Phi-4-mini rotates 96 of 128)."""
        self.rotary(kind)
        return self._dims[kind]

    def _write(self, kind: str | None) -> tuple[str, str]:
        e = self.e
        w = e.w
        suffix = f"_{kind}" if kind else ""
        tables = e.graph.rotary.tables(kind, e.context_length)
        self._dims[kind] = 2 * tables.cos.shape[1]
        cos = w.weight(f"cos_cache{suffix}", tables.cos.astype(e.dtype), parameter=False)
        sin = w.weight(f"sin_cache{suffix}", tables.sin.astype(e.dtype), parameter=False)
        if tables.switch_at is None:
            return cos, sin
        # longrope: the long tables once the total length passes the original context.
        long_cos = w.weight(f"cos_cache_long{suffix}", tables.long_cos.astype(e.dtype), parameter=False)
        long_sin = w.weight(f"sin_cache_long{suffix}", tables.long_sin.astype(e.dtype), parameter=False)
        name = f"/model/rotary{suffix}"
        is_long = w.op("Greater", [self.total_len, w.constant(tables.switch_at, np.int32)], f"{name}/is_long")

        def branch(label: str, pair: tuple[str, str]):
            outs = [f"{name}/{label}_cos", f"{name}/{label}_sin"]
            nodes = [helper.make_node("Identity", [src], [dst]) for src, dst in zip(pair, outs, strict=True)]
            values = [helper.make_tensor_value_info(o, e.onnx_type, None) for o in outs]
            return helper.make_graph(nodes, f"{name}/{label}", [], values)

        return tuple(
            w.node("If", [is_long], f"{name}/If", [f"{name}/cos", f"{name}/sin"],
                   then_branch=branch("long", (long_cos, long_sin)), else_branch=branch("short", (cos, sin)))
        )  # fmt: skip
