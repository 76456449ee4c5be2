"""matplotlib, the `plot` extra: imported only here, and only when a plot is drawn."""

from __future__ import annotations

from typing import Any

from surgery.diagnostics import HintedError


class PlotUnavailable(HintedError):
    """matplotlib is not installed: the message names the extra that brings it."""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, never a window); PlotUnavailable,
    with the install line as its hint, where the `plot` extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise PlotUnavailable("matplotlib is not installed", "pip install 'surgery[plot]'") from error
    return plt
