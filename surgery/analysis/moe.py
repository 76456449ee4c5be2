"""Mixture-of-experts modules that surgery builds itself: a dense MLP split into experts.

`SplitMoE` has the parameter layout of transformers' MoE blocks (a router `gate.weight` of
shape (experts, hidden), stacked `experts.gate_up_proj` (experts, 2I, hidden) and
`experts.down_proj` (experts, hidden, I)), so the exporter treats it like any MoE layer. Its
router is a hard top-k: the k experts with the highest router score each contribute with
weight 1, which makes `top E` (all experts) the dense MLP exactly, since the experts
partition the intermediate neurons.

The split rule (ours; docs/moe.md): intermediate neurons are clustered by their gate-projection
rows (unit-normalized) with k-means into E groups, rebalanced to equal sizes; the router row of
an expert is the mean of its neurons' unit gate rows, so an expert scores high on inputs its
neurons' gates align with. It needs no data and no training.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.nodes.moe import EmitsMoE


class _Router(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, top_k: int):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.top_k = top_k
        self.unit_weights = True  # selected experts count 1 each, no softmax weighting

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, indices) of the top-k experts per token."""
        index = torch.topk(x @ self.weight.T, self.top_k, dim=-1).indices
        return torch.ones(index.shape, dtype=x.dtype), index


class _Experts(torch.nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(gate_up)  # (experts, 2I, hidden)
        self.down_proj = torch.nn.Parameter(down)  # (experts, hidden, I)


class SplitMoE(EmitsMoE, torch.nn.Module):
    """A dense SwiGLU MLP refactored into experts with a hard top-k router."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, router: torch.Tensor, top_k: int):
        super().__init__()
        self.gate = _Router(router, top_k)
        self.experts = _Experts(gate_up, down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the chosen experts' SwiGLU outputs, per token."""
        weights, index = self.gate(x)
        gate, up = torch.einsum("...h,eih->...ei", x, self.experts.gate_up_proj).chunk(2, dim=-1)
        outputs = torch.einsum("...ei,ehi->...eh", torch.nn.functional.silu(gate) * up, self.experts.down_proj)
        dense = torch.zeros(*x.shape[:-1], self.experts.gate_up_proj.shape[0], dtype=x.dtype)
        dense.scatter_(-1, index, weights)
        return (outputs * dense[..., None]).sum(-2)


def balanced_clusters(rows: np.ndarray, groups: int, seed: int = 0, iterations: int = 20) -> list[np.ndarray]:
    """Indices of `rows` in `groups` equal-sized clusters (k-means on unit rows, then balanced)."""
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    size = len(unit) // groups
    rng = np.random.default_rng(seed)
    centres = unit[rng.choice(len(unit), groups, replace=False)]
    for _ in range(iterations):
        labels = _balanced_assign(unit @ centres.T, size)
        centres = np.stack([unit[labels == g].mean(0) for g in range(groups)])
        centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    labels = _balanced_assign(unit @ centres.T, size)
    return [np.flatnonzero(labels == g) for g in range(groups)]


def _balanced_assign(similarity: np.ndarray, size: int) -> np.ndarray:
    """Greedy: the most similar (neuron, cluster) pairs first, each cluster taking `size` neurons."""
    labels = np.full(similarity.shape[0], -1)
    room = np.full(similarity.shape[1], size)
    for flat in np.argsort(-similarity, axis=None, kind="stable"):
        neuron, cluster = divmod(int(flat), similarity.shape[1])
        if labels[neuron] < 0 and room[cluster] > 0:
            labels[neuron], room[cluster] = cluster, room[cluster] - 1
    return labels


@torch.no_grad()
def split_mlp(mlp: torch.nn.Module, experts: int, top_k: int, seed: int = 0) -> SplitMoE:
    """A SplitMoE computing `mlp` exactly when top_k == experts."""
    gate, up, down = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float()
    groups = balanced_clusters(gate.numpy(), experts, seed)
    gate_up = torch.stack([torch.cat([gate[g], up[g]]) for g in map(torch.from_numpy, groups)])
    down_stacked = torch.stack([down[:, torch.from_numpy(g)] for g in groups])
    unit = gate / gate.norm(dim=1, keepdim=True).clamp_min(1e-12)
    router = torch.stack([unit[torch.from_numpy(g)].mean(0) for g in groups])
    return SplitMoE(gate_up, down_stacked, router, top_k)
