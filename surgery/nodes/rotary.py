"""Rotary position tables, one per RoPE kind of the model (Gemma 3: one per layer type).

The tables come from the model's own rotary module, so every scaling it implements (linear,
llama3, yarn, longrope) is reproduced exactly. `longrope` (Phi-3) switches from its short to
its long factors once a sequence passes `original_max_position_embeddings`; the export keeps
both tables and picks one per run from the total length, as transformers does per forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RotaryTables:
    """cos/sin halves (positions, rotary_dim / 2) for one RoPE kind; `long_*` for longrope."""

    cos: np.ndarray
    sin: np.ndarray
    switch_at: int | None = None  # longrope: total lengths above this use the long tables
    long_cos: np.ndarray | None = None
    long_sin: np.ndarray | None = None


class Rotary:
    """The model's rotary embedding module, asked per RoPE kind (`None` = the model's only one)."""

    def __init__(self, module: torch.nn.Module, per_layer_type: bool, config, once: bool = False):
        self.module = module
        self.per_layer_type = per_layer_type
        self.config = config
        self.once = once  # the module returns each frequency once (gpt-oss), not in two halves

    def _call(self, module: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str | None):
        tables = module(hidden, position_ids, kind) if self.per_layer_type else module(hidden, position_ids)
        if isinstance(tables, torch.Tensor) and tables.is_complex():  # DeepSeek: e^(i theta), each frequency once
            cos, sin = tables.real, tables.imag
            return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        cos, sin = tables
        if self.once:
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return cos, sin

    def cos_sin(self, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str | None):
        """(cos, sin) of shape (batch, seq, rotary_dim) for these positions, as the model computes them."""
        return self._call(self.module, hidden, position_ids, kind)

    def rope_type(self, kind: str | None) -> str:
        """The RoPE type of one kind ('default', 'longrope', ...)."""
        types = getattr(self.module, "rope_type", "default")
        return str(types.get(kind, "default") if isinstance(types, dict) else types)

    def tables(self, kind: str | None, positions: int) -> RotaryTables:
        """Tables for positions 0..positions-1 (and the short/long pair for longrope).

        Computed on a copy of the module: transformers' longrope module switches its frequencies
        in place on every call, and the exporter runs while verification's PyTorch trace calls
        the model's own module in another thread.
        """
        module = copy.deepcopy(self.module)

        def halves(count: int):
            probe = torch.zeros(1, 1, dtype=torch.float32)
            with torch.no_grad():
                ids = torch.arange(count)[None]
                cos, sin = self._call(module, probe, ids, kind)
            half = cos.shape[-1] // 2
            return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()

        if self.rope_type(kind) != "longrope":
            cos, sin = halves(positions)
            return RotaryTables(cos, sin)
        params = getattr(self.config, "rope_parameters", None) or {}
        switch = int(params.get("original_max_position_embeddings")
                     or self.config.original_max_position_embeddings)  # fmt: skip
        # A forward whose largest position is below the switch uses the short factors.
        short_cos, short_sin = halves(min(switch, positions))
        long_cos, long_sin = halves(positions)
        return RotaryTables(short_cos, short_sin, switch, long_cos, long_sin)
