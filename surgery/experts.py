"""Expert usage on calibration data, and pruning experts out of a mixture-of-experts layer.

Works on transformers' MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE) and on surgery's own
`SplitMoE`, which share the layout: a router `gate` (weight: experts x hidden, `top_k`) and
stacked `experts.gate_up_proj` / `experts.down_proj`.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.models.graph import DecoderGraph, position_ids_from_mask


def expert_count(mlp: torch.nn.Module) -> int:
    """How many experts an MoE MLP has (0 for a dense MLP)."""
    experts = getattr(mlp, "experts", None)
    return int(experts.gate_up_proj.shape[0]) if experts is not None else 0


@torch.inference_mode()
def expert_frequencies(graph: DecoderGraph, layers: tuple[int, ...], tokens: np.ndarray) -> dict[int, list[float]]:
    """Per layer, the share of routed (token, slot) assignments each expert received."""
    counts = {layer: np.zeros(expert_count(graph.layer(layer).mlp)) for layer in layers}
    handles = []
    for layer in layers:
        router = graph.layer(layer).mlp.gate

        def count(module, args, output, layer=layer):
            index = output[-1]  # transformers: (logits, weights, index); SplitMoE: (weights, index)
            counts[layer] += np.bincount(index.reshape(-1).numpy(), minlength=len(counts[layer]))

        handles.append(router.register_forward_hook(count))
    try:
        for row in tokens:
            ids = torch.from_numpy(row)[None]
            mask = torch.ones_like(ids)
            graph.forward(ids, mask, position_ids_from_mask(mask), logits=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (c / c.sum()).tolist() for layer, c in counts.items()}


def most_used(frequencies: list[float], keep: int) -> tuple[int, ...]:
    """The `keep` most used experts, in their original order (ties: lower index first)."""
    order = sorted(range(len(frequencies)), key=lambda e: (-frequencies[e], e))
    return tuple(sorted(order[:keep]))


@torch.no_grad()
def keep_experts(mlp: torch.nn.Module, kept: tuple[int, ...]) -> None:
    """Remove every expert not in `kept` and its router row; top_k becomes min(top_k, kept)."""
    index = torch.tensor(kept)
    router, experts = mlp.gate, mlp.experts
    router.weight = torch.nn.Parameter(router.weight[index].clone())
    router.top_k = min(int(router.top_k), len(kept))
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[index].clone())
    experts.down_proj = torch.nn.Parameter(experts.down_proj[index].clone())
    for module in (router, experts):
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)
