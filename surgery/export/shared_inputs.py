"""What every attention layer of an export reads: sequence lengths, the total length, the padding
bias, positions, and the rotary cos/sin tables by RoPE kind (written once, on first use)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper


class SharedInputs:
    """What every attention layer reads: lengths, padding bias, positions, rotary tables by kind."""

    def __init__(self, emitter):
        self.e = emitter
        self.seqlens_k = self.total_len = self.bias = self.position_ids = self.new_mask = ""
        self._past = ""
        self._scalars: tuple[str, str, str] | None = None
        self._causal: dict[tuple[int | None, int], str] = {}
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

    def _lengths(self) -> tuple[str, str, str]:
        """(total, new tokens, past = total - new) as int64 scalars, from the inputs' shapes, once."""
        if not self._scalars:
            w, c, e = self.e.w, self.e.w.constant, self.e
            name = "/model/slots"
            total = w.op("Gather", [w.op("Shape", [e.attention_mask], f"{name}/mask_shape"), c(1)], f"{name}/total")
            seq = w.op("Gather", [w.op("Shape", [e.input_ids], f"{name}/ids_shape"), c(1)], f"{name}/seq")
            self._scalars = (total, seq, w.op("Sub", [total, seq], f"{name}/past"))
        return self._scalars

    def past_length(self) -> str:
        """The past length (total - new tokens) as a one-element int64 tensor, once: where a
        `pre-rope` cache's new queries start (surgery/nodes/pre_rope_cache.py)."""
        if not self._past:
            past = self._lengths()[2]
            self._past = self.e.w.op("Unsqueeze", [past, self.e.w.constant([0])], "/model/slots/past_1d")
        return self._past

    def causal_bias(self, window: int | None, groups: int) -> str:
        """The additive float32 mask of a `pre-rope` cache's attention, once per (window, groups):
        new token i (slot past + i) sees cached slot j where j <= past + i, the mask keeps j, and
        (sliding window) past + i - j < window; shape (batch, 1, groups * seq, total), the seq
        rows repeated for each query head of a group."""
        key = (window, groups)
        if key not in self._causal:
            w, c, e = self.e.w, self.e.w.constant, self.e
            name = f"/model/causal_bias/w{window or 0}_g{groups}"
            total, _, past = self._lengths()
            cached = w.op("Range", [c(0), total, c(1)], f"{name}/cached")
            new = w.op("Unsqueeze", [w.op("Range", [past, total, c(1)], f"{name}/new"), c([1])], f"{name}/new_column")
            allowed = w.op("LessOrEqual", [cached, new], f"{name}/causal")  # (seq, total)
            if window:
                near = w.op("Less", [w.op("Sub", [new, cached], f"{name}/distance"), c(int(window))], f"{name}/near")
                allowed = w.op("And", [allowed, near], f"{name}/window")
            kept = w.op("Cast", [e.attention_mask], f"{name}/kept", to=TensorProto.BOOL)
            kept = w.op("Unsqueeze", [kept, c([1, 2])], f"{name}/kept_4d")  # (batch, 1, 1, total)
            allowed = w.op("And", [allowed, kept], f"{name}/allowed")  # (batch, 1, seq, total)
            mask_value = np.float32(self.e.element.mask_value)
            bias = w.op("Where", [allowed, c(0.0, np.float32), c(mask_value, np.float32)], f"{name}/bias")
            if groups > 1:
                bias = w.op("Tile", [bias, c([1, 1, groups, 1])], f"{name}/Tile")
            self._causal[key] = bias
        return self._causal[key]

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
