"""What the quantizers do not take yet, per model and part: the one rule `quantize`, grouped
`quantize ... by` and `quantize model` all check."""

from __future__ import annotations

from surgery.models.index import ModelIndex


def unquantizable(index: ModelIndex, part: str) -> tuple[str, str] | None:
    """(message, hint) where this model's `part` (layers, attention, mlp, model) has linears the
    quantizers do not take yet: mixture-of-experts MLPs, and latent attention's absorbed
    per-head matrices (DeepSeek). None where they can be quantized."""
    if index.is_moe and part in ("layers", "mlp", "model"):
        return "quantizing mixture-of-experts MLPs is not supported yet", "quantize attention or head on this model"
    if index.latent_attention and part in ("layers", "attention", "model"):
        return ("quantizing multi-head latent attention is not supported yet",
                "quantize mlp or head on this model")  # fmt: skip
    return None
