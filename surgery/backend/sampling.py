"""How `surgery run` picks the next token: greedy, or sampled with a temperature and nucleus (top-p).

Greedy (temperature 0, the default) is what verification compares and what onnxruntime-genai
does by default; sampling is for trying an output as a chat model would be used. The draw is
seeded, so a run is repeatable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def token_chooser(temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Callable[[np.ndarray], int]:
    """A function from one position's logits (vocab,) to the chosen token id."""
    if temperature <= 0:
        return lambda logits: int(logits.argmax())
    generator = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        scaled = logits.astype(np.float64) / temperature
        probabilities = np.exp(scaled - scaled.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities, kind="stable")
        if top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
            cumulative = np.cumsum(probabilities[order])
            order = order[: int(np.searchsorted(cumulative, top_p)) + 1]
        kept = probabilities[order] / probabilities[order].sum()
        return int(order[generator.choice(len(order), p=kept)])

    return sample
