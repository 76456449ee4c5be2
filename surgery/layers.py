"""Small helpers for sets of original layer numbers."""

from __future__ import annotations

from collections.abc import Iterable


def format_layers(layers: Iterable[int]) -> str:
    """Compact text of sorted layer numbers: `0, 3, 20..29`."""
    ordered = sorted(set(layers))
    parts: list[str] = []
    start = prev = None
    for layer in [*ordered, None]:
        if start is not None and (layer is None or layer != prev + 1):
            parts.append(str(start) if start == prev else f"{start}..{prev}")
            start = None
        if layer is not None and start is None:
            start = layer
        prev = layer
    return ", ".join(parts) if parts else "none"


def evenly_spaced(count: int, num_layers: int) -> list[int]:
    """`count` layers spread evenly over the depth, never the first or the last.

    The interior 1..L-2 is cut at (i+1)(L-1)/(count+1); spacing is at least 1 when
    count <= L-2, so rounding never collides.
    """
    step = (num_layers - 1) / (count + 1)
    return [int((i + 1) * step + 0.5) for i in range(count)]
