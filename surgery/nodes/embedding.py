"""The token embedding, optionally scaled (Gemma: sqrt(hidden); Granite: embedding_multiplier)."""

from __future__ import annotations

import torch

from surgery.diagnostics import HintedError
from surgery.nodes.context import EmitContext


class TokenOutOfRange(HintedError):
    """A token id with no row in the embedding table: the tokenizer is not the model's."""


class Embedding(torch.nn.Module):
    """A lookup in the model's embedding table (a reference), times `scale`."""

    def __init__(self, weight: torch.nn.Parameter, scale: float = 1.0):
        super().__init__()
        self.weight = weight
        self.scale = float(scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (batch, seq, hidden) of the token ids; a TokenOutOfRange (a message, not an
        IndexError from deep inside PyTorch) for an id the table has no row for."""
        rows = self.weight.shape[0]
        if input_ids.numel() and int(input_ids.max()) >= rows:
            raise TokenOutOfRange(
                f"the tokenizer produced token id {int(input_ids.max())}, "
                f"but the model's embedding has only {rows} rows",
                "the tokenizer does not belong to this model: use the one saved with its weights",
            )
        hidden = torch.nn.functional.embedding(input_ids, self.weight)
        return hidden * self.scale if self.scale != 1.0 else hidden

    def emit(self, e: EmitContext, input_ids: str) -> tuple[str, str]:
        """(the residual stream's first value, the table's initializer name for a tied head; empty
        when the lookup is quantized, which a float head never shares)."""
        stored = e.options.quantize_embedding
        if stored is not None:
            table, hidden = "", e.quantized_lookup(self.weight, input_ids, stored)
        else:
            table = e.w.weight("model.embed_tokens.weight", e.array(self.weight))
            hidden = e.w.op("Gather", [table, input_ids], "/model/embed_tokens/Gather")
        if self.scale != 1.0:
            hidden = e.w.op("Mul", [hidden, e.scalar(self.scale)], "/model/embed_tokens/scale")
        return hidden, table
