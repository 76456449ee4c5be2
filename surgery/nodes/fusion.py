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

`fused_logits` is the PyTorch reference the exported graph is verified against; `HeadFusion`
emits its own ONNX nodes (the readouts during the layer walk, the mix at the head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from surgery.nodes.context import EmitContext
    from surgery.nodes.norm import RMSNorm

_NAME = "/lm_head/fusion"


@dataclass(frozen=True)
class HeadFusion:
    """Which layer(s) to fuse into the head, and how much. One layer = static."""

    layers: tuple[int, ...]
    weight: float
    dynamic: bool = False

    # The fusion's ONNX nodes. The final norm's gain absorbs the mixing weights (static), so a
    # readout is one more fused norm on the residual stream and the head stays one MatMul.

    def emit_readout_before_mlp(self, e: EmitContext, final_norm: RMSNorm, layer: int) -> str | None:
        """Dynamic fusion's FinalNorm(m) of a fused layer (its residual after attention, the
        IKS's "pre" distribution), or None when the layer needs none."""
        if layer not in self.layers or not self.dynamic:
            return None
        return e.pre(final_norm, f"{_NAME}/layer{layer}_pre_mlp_norm", scale=1.0)

    def emit_readout(self, e: EmitContext, final_norm: RMSNorm, layer: int) -> str | None:
        """FinalNorm(h) of a fused layer leaving it, static fusion's weight folded into the gain."""
        if layer not in self.layers:
            return None
        return e.pre(final_norm, f"{_NAME}/layer{layer}_norm", 1.0 if self.dynamic else self.weight)

    def emit_static(self, e: EmitContext, final: str, readouts: dict[int, tuple[str | None, str]]) -> str:
        """The head's input: (1 - a) FinalNorm(h_last) + a FinalNorm(h_l), both weights already in
        the gains, so one Add."""
        return e.w.op("Add", [final, readouts[self.layers[0]][1]], f"{_NAME}/Add")

    def emit_dynamic(
        self,
        e: EmitContext,
        final: str,
        operand: str,
        readouts: list[tuple[str, str]],
        vocab: int,
        post: Callable[[str], str] | None = None,
    ) -> None:
        """Per token: IKS of every candidate, argmin, and that candidate's readout mixed in;
        writes the `logits` and `fused_layer` outputs.

        All readouts go through the head in one MatMul over a stacked axis, so a decode step
        reads the vocabulary projection once however many candidates there are. The IKS
        compared is `sum p log p + q log q - (p+q) log(p+q)`, which is 2 JSD(p||q) - 2 log 2:
        the same argmin with fewer operations. `final` already carries the weight 1 - a;
        `post` is the head's logit post-processing, when the family has one.
        """
        w, c, name = e.w, e.w.constant, _NAME
        k = len(readouts)
        rows = [final] + [h for _, h in readouts] + [m for m, _ in readouts]
        stacked = w.op("Concat", [w.op("Unsqueeze", [r, c([2])], f"{name}/stack{i}") for i, r in enumerate(rows)],
                       f"{name}/stack", axis=2)  # fmt: skip
        logits = w.op("MatMul", [stacked, operand], "/lm_head/MatMul")  # (batch, seq, 1 + 2k, vocab)
        if post is not None:
            logits = post(logits)
        last, post, pre = w.node("Split", [logits, c([1, k, k])], f"{name}/split", 3, axis=2)
        log_q = w.op("LogSoftmax", [post], f"{name}/log_post", axis=-1)
        log_p = w.op("LogSoftmax", [pre], f"{name}/log_pre", axis=-1)
        p = w.op("Exp", [log_p], f"{name}/p")
        q = w.op("Exp", [log_q], f"{name}/q")
        both = w.op("Add", [p, q], f"{name}/p_plus_q")
        # Where both probabilities underflow, (p+q) log(p+q) is 0: clamp so 0 * log(0) is not NaN.
        log_both = w.op("Log", [w.op("Max", [both, e.scalar(1e-30)], f"{name}/clamp")], f"{name}/log_p_plus_q")
        own = w.op("Add", [w.op("Mul", [p, log_p], f"{name}/p_log_p"), w.op("Mul", [q, log_q], f"{name}/q_log_q")],
                   f"{name}/own")  # fmt: skip
        divergence = w.op("Sub", [own, w.op("Mul", [both, log_both], f"{name}/mix")], f"{name}/divergence")
        iks = w.op("ReduceSum", [divergence, c([-1])], f"{name}/iks", keepdims=0)  # (batch, seq, k)
        pick = w.op("ArgMin", [iks], f"{name}/argmin", axis=-1, keepdims=1)  # (batch, seq, 1)
        pick4 = w.op("Unsqueeze", [pick, c([3])], f"{name}/pick4")
        index = w.op("Expand", [pick4, c([1, 1, 1, vocab])], f"{name}/pick_expand")
        chosen = w.op("GatherElements", [post, index], f"{name}/chosen", axis=2)
        weighted = w.op("Mul", [chosen, e.scalar(self.weight)], f"{name}/weighted")
        mixed = w.op("Add", [last, weighted], f"{name}/Add")
        w.node("Squeeze", [mixed, c([2])], f"{name}/logits", ["logits"])
        layers = c(list(self.layers))
        w.node("Gather", [layers, w.op("Squeeze", [pick, c([2])], f"{name}/pick2")], f"{name}/layer", ["fused_layer"])


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
