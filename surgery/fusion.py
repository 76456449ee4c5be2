"""Layer Fused Decoding (LFD): mix an intermediate layer's logit-lens readout into the head.

The definitions are ours (the paper's equations are not public; ../docs/fusion.md):

- IKS of layer l, how much its MLP moves the logit-lens distribution: `p_pre =
  softmax(W_head FinalNorm(m_l))`, `p_post = softmax(W_head FinalNorm(h_l))`, `IKS(l) =
  JSD(p_pre || p_post)` (natural log), averaged over tokens for static selection.
- Fusion at weight a: `logits = (1 - a) W_head FinalNorm(h_last) + a W_head FinalNorm(h_l)`.
  The head is linear, so this is one head projection of `(1 - a) FinalNorm(h_last) + a
  FinalNorm(h_l)`: the compiled graph needs one extra norm and one add (the weights fold into
  the two norms' gains), not a second vocabulary projection.
- Dynamic: per token, l = argmin over the candidates of that token's IKS, then fuse l.

This module is the PyTorch reference the exported graph is verified against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadFusion:
    """Which layer(s) to fuse into the head, and how much. One layer = static."""

    layers: tuple[int, ...]
    weight: float
    dynamic: bool = False


def jsd(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence along the last axis, from log-probabilities (natural log)."""
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log((0.5 * (p + q)).clamp_min(1e-30))  # where both underflow, 0 * log 0 counts as 0
    return 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)


def readout(graph, hidden: torch.Tensor) -> torch.Tensor:
    """Logit lens: the head applied to the final norm of a residual."""
    return graph.readout(hidden)


def iks(graph, m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-token IKS of one layer from its residual after attention (m) and after the MLP (h)."""
    log_pre = torch.log_softmax(readout(graph, m).float(), dim=-1)
    log_post = torch.log_softmax(readout(graph, h).float(), dim=-1)
    return jsd(log_pre, log_post)


@dataclass(frozen=True)
class FusionChoice:
    """What dynamic fusion chose per token, and the IKS of every candidate (batch, seq, k)."""

    layer: torch.Tensor
    iks: torch.Tensor


def fused_logits(
    graph, fusion: HeadFusion, last: torch.Tensor, residuals: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, FusionChoice | None]:
    """Logits for the final residual and each fused layer's (m, h); for dynamic fusion, the choice."""
    a = fusion.weight
    final = readout(graph, last)
    if not fusion.dynamic:
        (layer,) = fusion.layers
        return (1 - a) * final + a * readout(graph, residuals[layer][1]), None
    scores = torch.stack([iks(graph, *residuals[layer]) for layer in fusion.layers], dim=-1)
    pick = scores.argmin(dim=-1)  # (batch, seq): position in fusion.layers
    posts = torch.stack([readout(graph, residuals[layer][1]) for layer in fusion.layers], dim=-2)
    selected = posts.gather(-2, pick[..., None, None].expand(*pick.shape, 1, posts.shape[-1])).squeeze(-2)
    return (1 - a) * final + a * selected, FusionChoice(torch.tensor(fusion.layers)[pick], scores)
