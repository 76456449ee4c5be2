"""A PNG of per-layer importance scores: one panel per metric, one line per part."""

from __future__ import annotations

from surgery.backend.output import write_atomically
from surgery.importance.file import ImportanceFile
from surgery.plotting import pyplot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plot_importance(importance: ImportanceFile, path: str) -> None:
    """Draw every metric's scores against the layer number and save a PNG."""
    plt = pyplot()

    metrics = list(importance.metrics.values())
    figure, axes = plt.subplots(len(metrics), 1, figsize=(9, 2.8 * len(metrics)), squeeze=False)
    for ax, scores in zip(axes[:, 0], metrics, strict=True):
        for part, values in scores.scores.items():
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=part)
        ax.set_title(f"{scores.metric} ({scores.more_important} = more important)")
        ax.set_xlabel("layer (original numbering)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    model = importance.model.get("spec", "")
    figure.suptitle(f"layer importance{f' of {model}' if model else ''}")
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"), ".png")
    plt.close(figure)
