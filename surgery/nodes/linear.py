"""Linear layers: references to Hugging Face `nn.Linear` modules, or views of a fused one."""

from __future__ import annotations

import torch

from surgery.nodes.context import EmitContext


def linear_view(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Linear:
    """An `nn.Linear` whose weight is `weight` itself (a view of a fused projection, no copy)."""
    out_features, in_features = weight.shape
    layer = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    # The fused parameters these are views of, so lazily loaded weights can take the same views
    # (surgery.models.lazy); set past nn.Module's __setattr__, which would register them.
    object.__setattr__(layer, "fused_parents", (weight._base, bias._base if bias is not None else None))
    return layer


def emit_linear(e: EmitContext, module: torch.nn.Linear, x: str, name: str) -> str:
    """`x @ W.T (+ b)` as a MatMul against the pre-transposed weight (and an Add for the bias).

    The MatMul is recorded under `name` so quantization passes can find it.
    """
    y = e.linear(name, x, module.weight, f"{name}.weight", f"{name}/MatMul")
    if module.bias is not None:
        y = e.w.op("Add", [y, e.w.weight(f"{name}.bias", e.array(module.bias))], f"{name}/Add")
    return y
