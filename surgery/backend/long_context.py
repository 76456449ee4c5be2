"""Windows longer than a piece, streamed: a window's tokens go through the model a piece at a
time with the KV cache, so its logits (32k positions of a 152k vocabulary are 20 GB) and its
attention scores (heads x T x T) never exist whole.

- onnxruntime: the window is prefilled in pieces of `PIECE` tokens through the output's own KV
  cache (chunked prefill), yielding each piece's logits.
- PyTorch (the reference): layer-major, as every reference here is (`forward_layerwise`): each
  layer is loaded once, and every window goes through it a piece at a time with that layer's
  KV cache for the window (held for the window only), so what is held is a layer, the windows'
  hidden states and one window's keys and values for one layer. The head then runs a piece at
  a time.

Both are what `surgery.backend.evaluate` scores piece by piece (it reads `PIECE` here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from surgery.ir.graph import DecoderGraph, ReferenceSequence
from surgery.ir.inputs import KVCache, on_device

PIECE = 512  # a long window's positions go through the model (and are scored) this many at a time


def streamed_prefill(model, ids: np.ndarray, with_cache: bool = False) -> Iterator:
    """The (piece, vocab) logits of a (1, T) window, prefilled `PIECE` tokens at a time through
    `model`'s KV cache (an OnnxCausalLM exported with one); with `with_cache`, each piece's
    logits and the cache after it (to decode from once the prompt is in)."""
    past = None
    for start in range(0, ids.shape[1], PIECE):
        piece = ids[:, start : start + PIECE]
        end = start + piece.shape[1]
        out = model.step(piece, np.ones((1, end), np.int64), np.arange(start, end)[None], past)
        past = out.present
        yield (out.logits[0], past) if with_cache else out.logits[0]


def prefill_in_pieces(model, ids: np.ndarray) -> tuple[np.ndarray, list]:
    """(the last piece's logits, the KV cache) after prefilling a (1, T) prompt a piece at a time."""
    logits = present = None
    for logits, present in streamed_prefill(model, ids, with_cache=True):  # noqa: B007 (the last is kept)
        pass
    return logits, present


@torch.no_grad()
def graph_windows_streamed(
    graph: DecoderGraph,
    windows: list[np.ndarray],
    each: Callable[[np.ndarray, Iterator[np.ndarray]], None],
    device: str | None = None,
) -> None:
    """Every window through the graph layer-major and a piece at a time (see the module
    docstring); then `each(window, its pieces' logits)` per window, the head run lazily as
    the pieces are consumed."""
    if graph.fusion is not None:
        raise ValueError("layer-major forward does not run layer fusion")
    size = PIECE
    pieces = [[torch.from_numpy(w[start : start + size][None]).long() for start in range(0, len(w), size)]
              for w in windows]  # fmt: skip
    if device is not None:
        pieces = [[ids.to(device) for ids in window] for window in pieces]
    with graph.materialized(graph.embedding, device=device):
        hidden = [[graph.embedding(ids) for ids in window] for window in pieces]
    with on_device([graph.rotary.module] if graph.rotary is not None else [], device):
        for layer in graph.each_layer_materialized():
            with on_device(layer.modules(), device):
                for window, states in zip(pieces, hidden, strict=True):
                    cache = KVCache([None], [None])  # this layer's keys and values of this window
                    start = 0
                    for i, ids in enumerate(window):
                        end = start + ids.shape[1]
                        run = ReferenceSequence(ids, torch.ones(1, end, dtype=torch.long, device=ids.device),
                                                torch.arange(start, end, device=ids.device)[None], cache)  # fmt: skip
                        states[i], _ = run.through(layer, states[i], graph.rotary, None)
                        start = end
    with graph.materialized(graph.head.final_norm, graph.head, device=device):
        for window, states in zip(windows, hidden, strict=True):
            each(window, (graph.head(state)[0].float().cpu().numpy() for state in states))
            states.clear()
