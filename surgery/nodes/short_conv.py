"""A gated short convolution in place of attention (LFM2's `conv` layers), with its own cache state.

PyTorch: padding positions of the input are zeroed (as transformers does), `in_proj` gives three
channels' worth `B, C, x`; `B * x` runs through a causal depthwise convolution over time whose
window reaches `kernel - 1` positions back; `C` gates its output and `out_proj` projects it. The
cache of such a layer is not a KV cache that grows with the context but the last `kernel - 1`
inputs of the convolution, a fixed (batch, hidden, kernel - 1) state per layer.

ONNX: onnxruntime's `CausalConvWithState` (com.microsoft), which reads the past state and writes
the present one, between the projections, as onnxruntime-genai's builder emits it, so genai runs
the exported model with its LFM2 state handling (`past.%d.conv` inputs, `present.%d.conv` outputs).
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.nodes.context import MS, EmitContext
from surgery.nodes.linear import emit_linear


class ShortConv(torch.nn.Module):
    """One layer's short-convolution block (without its norm, which the layer holds)."""

    def __init__(self, in_proj: torch.nn.Linear, conv: torch.nn.Conv1d, out_proj: torch.nn.Linear):
        super().__init__()
        # References to the model's own modules: the depthwise kernel is conv.weight (hidden, 1, kernel).
        self.in_proj, self.conv, self.out_proj = in_proj, conv, out_proj
        self.channels = int(conv.weight.shape[0])
        self.kernel = int(conv.weight.shape[-1])

    @property
    def state_width(self) -> int:
        """Positions of convolution input the cache carries from one step to the next."""
        return self.kernel - 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, state=None) -> torch.Tensor:
        """The block's update for `x` (batch, seq, hidden); `mask` (batch, seq) marks the new
        positions that are real tokens; `state` is (cache, slot), read and advanced in place."""
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        inputs = (b * v).transpose(1, 2)  # (batch, hidden, seq)
        past = None
        if state is not None:
            cache, slot = state
            past = cache.convs[slot]
        if past is None:
            past = inputs.new_zeros(inputs.shape[0], self.channels, self.state_width)
        window = torch.cat([past.to(inputs.dtype), inputs], dim=-1)
        if state is not None:
            cache.convs[slot] = window[..., window.shape[-1] - self.state_width :]
        weight = self.conv.weight.to(inputs.dtype)
        bias = self.conv.bias.to(inputs.dtype) if self.conv.bias is not None else None
        out = torch.nn.functional.conv1d(window, weight, bias, groups=self.channels)
        return self.out_proj(c * out.transpose(1, 2))

    def emit(self, e: EmitContext, x: str, name: str, new_mask: str | None, past: str, present: str) -> str:
        """The block's nodes on `x` (batch, seq, hidden); `new_mask` is the mask of the new
        positions as (batch, seq, 1) in the element type, or None where padding can only follow
        the real tokens (the CUDA form), which a causal convolution never reads; `past`/`present`
        are the state's graph input and output."""
        w = e.w
        if new_mask is not None:
            x = w.op("Mul", [x, new_mask], f"/{name}/mask_padding")
        bcx = emit_linear(e, self.in_proj, x, f"{name}.in_proj")
        b, c, v = w.node("Split", [bcx, w.constant([self.channels] * 3)], f"/{name}/Split", 3, axis=-1)
        inputs = w.op("Transpose", [w.op("Mul", [b, v], f"/{name}/gate_in")], f"/{name}/to_channels", perm=[0, 2, 1])
        kernel = w.weight(f"{name}.conv.weight", e.array(self.conv.weight))
        bias = w.weight(f"{name}.conv.bias", e.array(self.conv.bias)) if self.conv.bias is not None else ""
        out, _ = w.node("CausalConvWithState", [inputs, kernel, bias, past], f"/{name}/CausalConvWithState",
                        [f"/{name}/conv_out", present], MS, ndim=1, activation="none")  # fmt: skip
        out = w.op("Transpose", [out], f"/{name}/to_sequence", perm=[0, 2, 1])
        return emit_linear(e, self.out_proj, w.op("Mul", [c, out], f"/{name}/gate_out"), f"{name}.out_proj")


def empty_state(batch: int, channels: int, width: int, dtype) -> np.ndarray:
    """A convolution state before the first token: zeros, as the causal padding is."""
    return np.zeros((batch, channels, width), dtype)
