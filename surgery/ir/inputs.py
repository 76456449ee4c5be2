"""What a forward of the decoder graph takes besides the weights: its KV cache, its attention
bias and positions, calibration batches, and where its modules run (`on_device`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

# observer(layer number, x entering the layer, m after attention, h leaving the layer): what a
# forward reports of each layer's residual stream to importance scoring and verification.
ResidualObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class KVCache:
    """Keys and values per kept attention layer, (batch, kv_heads, length, head_dim) each, and the
    state of each short-convolution layer (LFM2), (batch, hidden, kernel - 1)."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    convs: list[torch.Tensor | None] = field(default_factory=list)

    def length(self) -> int:
        """Number of cached positions (0 before the first step)."""
        for key in self.keys:
            if key is not None:
                return int(key.shape[2])
        return 0

    def append(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys and values to one slot; returns the slot's whole keys and values."""
        if self.keys[slot] is not None:
            key = torch.cat([self.keys[slot], key], dim=2)
            value = torch.cat([self.values[slot], value], dim=2)
        self.keys[slot], self.values[slot] = key, value
        return key, value


@contextlib.contextmanager
def in_dtype(modules: list[torch.nn.Module], dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, the floating parameters of `modules` are `dtype` copies; after, each
    parameter holds its original tensor again (kept, not copied back: nothing written to the
    copies survives). None changes nothing. Buffers (rotary frequencies) keep their type, as the
    nodes compute their tables in fp32 and cast the result to the activations'."""
    if dtype is None:
        yield
        return
    originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    for module in modules:
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != dtype and id(param) not in originals:
                originals[id(param)] = (param, param.data)
                param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, data in originals.values():
            param.data = data


@contextlib.contextmanager
def on_device(modules: list[torch.nn.Module], device: str | None) -> Iterator[None]:
    """Within the block, the parameters and buffers of `modules` are on `device`; those it moved
    go back to the CPU after.

    The CPU (or None) moves nothing. Only what this block moved goes back, so a tied head kept
    on the device by an outer block stays there when an inner block was done with the
    embedding. Parameters keep their identity, so lazy weights loaded onto the CPU and moved
    here are released as usual afterwards.
    """
    if device is None or torch.device(device).type == "cpu":
        yield
        return
    target = torch.device(device)
    moved_parameters: dict[int, torch.nn.Parameter] = {}
    moved_buffers: list[tuple[torch.nn.Module, str]] = []
    for module in modules:
        for part in module.modules():
            for param in part.parameters(recurse=False):
                if param.device.type == "cpu" and id(param) not in moved_parameters:
                    param.data = param.data.to(target)
                    moved_parameters[id(param)] = param
            for name, buffer in part.named_buffers(recurse=False):
                if buffer is not None and buffer.device.type == "cpu":
                    part._buffers[name] = buffer.to(target)
                    moved_buffers.append((part, name))
    try:
        yield
    finally:
        for param in moved_parameters.values():
            # One released inside the block (verification's written weights are) is on meta:
            # nothing to bring back.
            if param.device.type != "meta":
                param.data = param.data.to("cpu")
        for part, name in moved_buffers:
            part._buffers[name] = part._buffers[name].to("cpu")  # type: ignore[union-attr]


def attention_bias(
    attention_mask: torch.Tensor, query_len: int, past_len: int, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive (batch, 1, query, key) mask: causal, padding, and an optional sliding window.

    Positions are indices into the padded sequence, as in transformers: query i sits at
    `past_len + i`; it sees key j when j <= that index, the key is not padding, and (with a
    window) the distance is below the window.
    """
    total = attention_mask.shape[1]
    device = attention_mask.device
    query_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= (query_pos - key_pos) < window
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def calibration_batches(tokens: np.ndarray, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """(ids, mask, positions) of each batch of unpadded calibration samples (rows of `tokens`)."""
    batches = []
    for start in range(0, len(tokens), batch_size):
        ids = torch.from_numpy(tokens[start : start + batch_size])
        mask = torch.ones_like(ids)
        batches.append((ids, mask, position_ids_from_mask(mask)))
    return batches


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (left padding gets position 1, as transformers does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)
