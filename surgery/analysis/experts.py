"""Expert usage on calibration data, and pruning experts out of a mixture-of-experts layer.

Works on transformers' MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE) and on surgery's own
`SplitMoE`, which share the layout: a router `gate` (weight: experts x hidden, `top_k`) and
stacked `experts.gate_up_proj` / `experts.down_proj`.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.analysis import expert_rules
from surgery.ir.graph import DecoderGraph
from surgery.ir.inputs import calibration_batches
from surgery.nodes.moe import EmitsMoE

_BATCH_ROWS = 8  # calibration samples per batch


def expert_count(mlp: torch.nn.Module) -> int:
    """How many experts an MoE MLP has (0 for a dense MLP)."""
    experts = getattr(mlp, "experts", None)
    return int(experts.gate_up_proj.shape[0]) if experts is not None else 0


@torch.inference_mode()
def expert_statistics(
    graph: DecoderGraph,
    layers: tuple[int, ...],
    tokens: np.ndarray,
    outputs: bool = False,
    device: str | None = None,
) -> tuple[dict[int, list[float]], dict[int, np.ndarray]]:
    """One pass over the calibration tokens: per layer, each expert's share of the routed
    (token, slot) assignments and, with `outputs`, its mean output over all tokens (every
    expert run on every token from the residual entering the MLP: HC-SMoE's feature).

    The pass is layer-major (`DecoderGraph.forward_layerwise`): a lazily loaded model is read
    one layer at a time, and the statistics equal those of whole-model forwards. `device`
    ("cuda"): each layer runs there in turn (sequential onloading); the counts come back."""
    counts = {layer: np.zeros(expert_count(graph.layer(layer).mlp)) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        mlp = graph.layer(layer).mlp

        def count(module, args, output, layer=layer):
            index = output[-1]  # transformers: (logits, weights, index); SplitMoE: (weights, index)
            counts[layer] += np.bincount(index.reshape(-1).cpu().numpy(), minlength=len(counts[layer]))

        def collect(module, args, layer=layer, mlp=mlp):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            gate, up = torch.einsum("th,eih->eti", x, mlp.experts.gate_up_proj.float()).chunk(2, dim=-1)
            out = torch.einsum("eti,ehi->eth", torch.nn.functional.silu(gate) * up, mlp.experts.down_proj.float())
            sums[layer] = sums.get(layer, 0) + out.double().sum(1)

        handles.append(mlp.gate.register_forward_hook(count))
        if outputs:
            handles.append(mlp.register_forward_pre_hook(collect))  # the MLP's input, after any norm
    batches = calibration_batches(tokens, _BATCH_ROWS)
    try:
        # Layer-major: each layer is loaded once and every batch passes through it, so a model
        # whose weights stay in the checkpoint is counted a layer at a time.
        graph.forward_layerwise(batches, logits=False, device=device)
    finally:
        for handle in handles:
            handle.remove()
    frequencies = {layer: (c / c.sum()).tolist() for layer, c in counts.items()}
    return frequencies, {layer: (total / tokens.size).cpu().numpy() for layer, total in sums.items()}


def expert_frequencies(
    graph: DecoderGraph, layers: tuple[int, ...], tokens: np.ndarray, device: str | None = None
) -> dict[int, list[float]]:
    """Per layer, the share of routed (token, slot) assignments each expert received."""
    return expert_statistics(graph, layers, tokens, device=device)[0]


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
    for name, parameter in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, torch.nn.Parameter(parameter[index].clone()))
    for module in (router, experts):
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


def group_by_outputs(features: np.ndarray, groups: int) -> list[list[int]]:
    """HC-SMoE: average-linkage agglomerative clustering on cosine distance, to `groups` clusters."""
    distance = 1 - _cosine(features, features)
    clusters = [[i] for i in range(len(features))]
    while len(clusters) > groups:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                d = distance[np.ix_(clusters[i], clusters[j])].mean()
                if best is None or d < best[0]:
                    best = (d, i, j)
        _, i, j = best
        clusters[i] = sorted(clusters[i] + clusters.pop(j))
    return sorted(clusters)


def group_by_router(router: np.ndarray, frequencies: list[float], groups: int) -> list[list[int]]:
    """MC-SMoE: the most used experts lead; every other expert joins the leader whose router row is most similar."""
    leaders = list(most_used(frequencies, groups))
    similarity = _cosine(router, router[leaders])
    members: dict[int, list[int]] = {leader: [leader] for leader in leaders}
    for expert in range(len(router)):
        if expert not in members:
            members[leaders[int(np.argmax(similarity[expert]))]].append(expert)
    return sorted(sorted(group) for group in members.values())


def align_to_leader(gate_up: torch.Tensor, down: torch.Tensor, leader: int, member: int) -> torch.Tensor:
    """The permutation of `member`'s intermediate neurons that best matches `leader`'s (MC-SMoE).

    A neuron is its gate row, up row and down column together, unit-normalized; the permutation
    maximizes the summed cosine similarity of matched neurons (Hungarian assignment). Averaging
    two experts without it averages unrelated neurons: an expert's neuron order is arbitrary.
    """
    from scipy.optimize import linear_sum_assignment

    inter = down.shape[-1]

    def neurons(e: int) -> torch.Tensor:
        rows = torch.cat([gate_up[e, :inter], gate_up[e, inter:], down[e].T], dim=1).double()
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)

    _, columns = linear_sum_assignment(-(neurons(leader) @ neurons(member).T).numpy())
    return torch.from_numpy(columns)


def shared_subspace(stacked: torch.Tensor, weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-MoE's joint SVD of one group's weights, truncated: factors (left, right) with
    left @ right = U_r U_r^T (sum_i w_i W_i), U_r the top-`rank` left singular vectors of the
    members' weights side by side [W_1 ... W_k]; left is (out, rank), right (rank, in)."""
    side_by_side = torch.cat(list(stacked.double()), dim=1)
    left = torch.linalg.svd(side_by_side, full_matrices=False).U[:, :rank]
    average = (stacked.double() * weights.double()[:, None, None]).sum(0)
    return left.to(stacked.dtype), (left.T @ average).to(stacked.dtype)


class LowRankExperts(torch.nn.Module):
    """Stacked experts stored as rank-r factors: gate_up = gate_up_left @ gate_up_right, down likewise.

    `gate_up_proj` and `down_proj` give the products, so code reading dense experts still works;
    the exporter writes the factors (two MatMuls each), which is where the bytes are saved.
    """

    def __init__(self, gate_up: list[tuple[torch.Tensor, torch.Tensor]], down: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.gate_up_left = torch.nn.Parameter(torch.stack([a for a, _ in gate_up]))  # (experts, 2I, r)
        self.gate_up_right = torch.nn.Parameter(torch.stack([b for _, b in gate_up]))  # (experts, r, hidden)
        self.down_left = torch.nn.Parameter(torch.stack([a for a, _ in down]))  # (experts, hidden, r)
        self.down_right = torch.nn.Parameter(torch.stack([b for _, b in down]))  # (experts, r, I)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """(experts, 2I, hidden), the product of the factors."""
        return self.gate_up_left @ self.gate_up_right

    @property
    def down_proj(self) -> torch.Tensor:
        """(experts, hidden, I), the product of the factors."""
        return self.down_left @ self.down_right


def full_rank(gate_up: torch.Tensor, down: torch.Tensor) -> int:
    """The rank an expert's weights can have, from its gate_up (2I x hidden) and down (hidden x I)."""
    return expert_rules.full_rank(int(down.shape[-2]), int(down.shape[-1]))


class MergedMoE(EmitsMoE, torch.nn.Module):
    """Experts merged into groups; the router still scores the N original experts.

    Each group's members are first aligned neuron by neuron to its first member (the caller
    puts the most used one first), then averaged with the given weights; with `rank`, each
    merged expert keeps only the top-`rank` shared subspace of its members (Sub-MoE) and is
    stored factored. Routing (as the baselines' code): top-k over the N original logits with the
    router's own weights, each chosen expert mapped to its group, weights landing on one group added.
    """

    def __init__(
        self,
        original: torch.nn.Module,
        groups: list[list[int]],
        weights: list[list[float]],
        align: bool = True,
        rank: int | None = None,
    ):
        super().__init__()
        self.gate = original.gate
        gate_up, down = original.experts.gate_up_proj.detach(), original.experts.down_proj.detach()
        inter = down.shape[-1]
        merged_gate_up, merged_down = [], []
        for members, w in zip(groups, weights, strict=True):
            member_gate_up, member_down = [gate_up[members[0]]], [down[members[0]]]
            for member in members[1:]:
                order = align_to_leader(gate_up, down, members[0], member) if align else torch.arange(inter)
                member_gate_up.append(torch.cat([gate_up[member, :inter][order], gate_up[member, inter:][order]]))
                member_down.append(down[member][:, order])
            w = torch.tensor(w, dtype=gate_up.dtype)
            stacked_gate_up, stacked_down = torch.stack(member_gate_up), torch.stack(member_down)
            if rank is None:
                merged_gate_up.append((stacked_gate_up * w[:, None, None]).sum(0))
                merged_down.append((stacked_down * w[:, None, None]).sum(0))
            else:
                merged_gate_up.append(shared_subspace(stacked_gate_up, w, rank))
                merged_down.append(shared_subspace(stacked_down, w, rank))
        if rank is None:
            self.experts = torch.nn.Module()
            self.experts.gate_up_proj = torch.nn.Parameter(torch.stack(merged_gate_up))
            self.experts.down_proj = torch.nn.Parameter(torch.stack(merged_down))
        else:
            self.experts = LowRankExperts(merged_gate_up, merged_down)
        group_of = torch.zeros(gate_up.shape[0], dtype=torch.long)
        for g, members in enumerate(groups):
            group_of[members] = g
        self.register_buffer("group_of", group_of)
        for name in ("shared_expert", "shared_expert_gate"):  # Qwen2-MoE's shared expert stays as it is
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped routing, then the merged experts' weighted sum."""
        flat = x.reshape(-1, x.shape[-1])
        routed = self.gate(flat)
        weights, index = routed[-2], routed[-1]
        dense = torch.zeros(flat.shape[0], len(self.experts.gate_up_proj), dtype=x.dtype)
        dense.scatter_add_(-1, self.group_of[index], weights.to(x.dtype))
        gate, up = torch.einsum("th,eih->tei", flat, self.experts.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("tei,ehi->teh", torch.nn.functional.silu(gate) * up, self.experts.down_proj)
        result = (out * dense[..., None]).sum(1)
        if hasattr(self, "shared_expert"):
            result = result + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return result.reshape(x.shape)
