"""Putting the sensitivity of every tensor in one unit: KL divergence at the model's output.

The per-tensor errors of `surgery.analysis.calibrated_quantization` are each relative to what
the tensor perturbs: the residual stream for a layer's linears, the logits for the head. The two
are not the same unit, and the head of a small model with a large vocabulary is a fifth to
three fifths of its weights, so the exchange rate decides most of the budget. The probe
measures it on a few calibration samples while the walk runs:

- a second copy of their hidden states passes through every layer with all of its linears
  rounded to nearest in `REFERENCE` (int4, blocks of 64), so at the end the KL divergence of
  that model's next-token distribution from the float model's is known; dividing it by the
  sum of the layers' relative errors in that format gives the KL per unit of relative error,
  which turns every layer linear's error into KL;
- the head is rounded in each candidate format, as the output will round it (weighted grids,
  and GPTQ when the recipe asks: GPTQ helps a head of many rows and few columns far more than
  a layer's linears, so its error measured to nearest would overstate it), and its KL on the
  float hidden states is measured directly.

Quantization errors of separate tensors roughly add up in KL at these sizes, which is what
the knapsack assumes. What is held: the probe's hidden states twice (`PROBE_TOKENS` tokens) and
its logits a slice of tokens at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.formats.weights import WeightFormat

REFERENCE = WeightFormat(4, 64, half_scales=True)  # one of the preset's FORMATS
PROBE_TOKENS = 1024  # calibration tokens the probe follows through the model
_LOGIT_VALUES = 1 << 24  # logits computed at once (64 MB of fp32)


def probe_rows(tokens: np.ndarray) -> np.ndarray:
    """The calibration samples the probe follows: the first, up to PROBE_TOKENS tokens."""
    return tokens[: max(1, PROBE_TOKENS // tokens.shape[1])]


def mean_kl(head, reference: torch.Tensor, candidate: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Mean KL(p_reference || p_candidate) per token of the head's next-token distributions on two
    final hidden states (batch, seq, hidden); `weight` replaces the head's for the candidate."""
    reference = reference.reshape(-1, reference.shape[-1])
    candidate = candidate.reshape(-1, candidate.shape[-1])
    rows = max(1, _LOGIT_VALUES // head.weight.shape[0])
    total = 0.0
    for start in range(0, reference.shape[0], rows):
        p = torch.log_softmax(head(reference[start : start + rows]).float(), -1)
        if weight is None:
            q_logits = head(candidate[start : start + rows])
        else:
            q_logits = head.post(torch.nn.functional.linear(head.final_norm(candidate[start : start + rows]), weight))
        q = torch.log_softmax(q_logits.float(), -1)
        del q_logits
        q.neg_().add_(p)  # log p - log q, in place: two chunks of logits live, not five
        total += float(q.mul_(p.exp_()).sum())
    return total / max(1, reference.shape[0])


def to_kl(errors: dict[str, dict[WeightFormat, float]], layers_kl: float, head_kl: dict[WeightFormat, float],
          head: str) -> None:  # fmt: skip
    """Rescale the layer linears' relative errors to KL in place (one rate, from the probe's
    all-layers KL in REFERENCE) and set the head's errors to its measured KL per format."""
    total = sum(e[REFERENCE] for name, e in errors.items() if name != head and REFERENCE in e)
    rate = layers_kl / total if total > 0 else 1.0
    for name, per_format in errors.items():
        if name != head:
            for stored in per_format:
                per_format[stored] *= rate
    if head in errors:
        errors[head] = dict(head_kl)
