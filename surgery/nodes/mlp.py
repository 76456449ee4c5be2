"""The dense MLPs: gated, `down(act(gate(x)) * up(x))` with SiLU (SwiGLU) or tanh-GELU (GeGLU);
and plain, `down(act(up(x)))` with squared ReLU (Nemotron)."""

from __future__ import annotations

import torch

from surgery.nodes.context import MS, EmitContext
from surgery.nodes.linear import emit_linear


class GatedMLP(torch.nn.Module):
    """A dense gated MLP over references to the model's gate, up and down projections."""

    def __init__(self, gate_proj: torch.nn.Linear, up_proj: torch.nn.Linear, down_proj: torch.nn.Linear,
                 activation: str = "silu"):  # fmt: skip
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's activation."""
        if self.activation == "gelu_tanh":
            return torch.nn.functional.gelu(x, approximate="tanh")
        return torch.nn.functional.silu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output for the (normalized) residual x."""
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def emit(self, e: EmitContext, x: str, name: str) -> str:
        """Two MatMuls, the activation (Sigmoid*Mul or FastGelu), a Mul and the down MatMul."""
        gate = emit_linear(e, self.gate_proj, x, f"{name}.gate_proj")
        up = emit_linear(e, self.up_proj, x, f"{name}.up_proj")
        if self.activation == "gelu_tanh":
            act = e.w.op("FastGelu", [gate], f"/{name}/act/FastGelu", MS)
        else:
            act = e.w.op("Mul", [gate, e.w.op("Sigmoid", [gate], f"/{name}/act/Sigmoid")], f"/{name}/act/Mul")
        hidden = e.w.op("Mul", [act, up], f"/{name}/Mul")
        return emit_linear(e, self.down_proj, hidden, f"{name}.down_proj")


class DenseMLP(torch.nn.Module):
    """A dense MLP without a gate over references to the model's up and down projections:
    `down(relu(up(x))^2)` (Nemotron's squared ReLU)."""

    def __init__(self, up_proj: torch.nn.Linear, down_proj: torch.nn.Linear, activation: str = "relu2"):
        super().__init__()
        if activation != "relu2":
            raise ValueError(f"a plain MLP's activation is relu2, not {activation}")
        self.up_proj, self.down_proj = up_proj, down_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output for the (normalized) residual x."""
        return self.down_proj(torch.relu(self.up_proj(x)).square())

    def emit(self, e: EmitContext, x: str, name: str) -> str:
        """The up MatMul, Relu, a Mul by itself (the square) and the down MatMul."""
        up = emit_linear(e, self.up_proj, x, f"{name}.up_proj")
        positive = e.w.op("Relu", [up], f"/{name}/act/Relu")
        hidden = e.w.op("Mul", [positive, positive], f"/{name}/act/Square")
        return emit_linear(e, self.down_proj, hidden, f"{name}.down_proj")
