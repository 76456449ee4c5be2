"""search.png: every candidate a search measured, quality against cost, the Pareto front drawn.

One panel per search. The y axis is the first quality budget's measure (perplexity increase,
KL or top-1 against the unmodified model); without one, average bits. The x axis is the first
latency budget's milliseconds, else the model's size in MB. Each point is labelled with its
count; the answer is circled, and the limits are dashed lines.
"""

from __future__ import annotations

from surgery.backend.output import write_atomically
from surgery.front.budgets import LatencyBudget, QualityBudget, SizeBudget
from surgery.plotting import PlotUnavailable, pyplot


def _axes_budgets(search):
    budgets = search.target.fit.budgets
    quality = next((b for b in budgets if isinstance(b, QualityBudget)), None)
    cost = next((b for b in budgets if isinstance(b, LatencyBudget)), None)
    cost = cost or next((b for b in budgets if isinstance(b, SizeBudget) and b.measure == "size"), None)
    return quality, cost


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy <= y) and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_searches(searches: list, path: str) -> str | None:
    """Draw and save the PNG; None, or why it was not drawn (no matplotlib)."""
    from surgery.search.results import budget_value

    try:
        plt = pyplot()
    except PlotUnavailable as problem:
        return f"{problem} ({problem.hint})"

    figure, axes = plt.subplots(1, len(searches), figsize=(6.5 * len(searches), 4.5), squeeze=False)
    for ax, search in zip(axes[0], searches, strict=True):
        quality, cost = _axes_budgets(search)
        candidates = sorted(search.candidates, key=lambda c: c.count)

        points = [
            (
                budget_value(cost, c.measured) if cost else c.measured["bytes"] / 1e6,
                budget_value(quality, c.measured) if quality else c.measured["bits"],
            )
            for c in candidates
        ]
        # Lower is better on both axes, except top-1 agreement (higher is better).
        flip = -1 if quality is not None and quality.measure == "top1" else 1
        front = pareto_front([(x, flip * y) for x, y in points])
        colours = ["tab:green" if c.fits else "tab:red" for c in candidates]
        ax.scatter([p[0] for p in points], [p[1] for p in points], c=colours, zorder=3)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="grey", lw=1, zorder=2,
                label="Pareto front")  # fmt: skip
        for candidate, (x, y) in zip(candidates, points, strict=True):
            ax.annotate(str(candidate.count), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if search.answer is not None and candidate.count == search.answer.count:
                ax.scatter([x], [y], s=180, facecolors="none", edgecolors="black", zorder=4, label="answer")
        if quality is not None:
            limit = quality.limit
            ax.axhline(limit, color="tab:red", ls="--", lw=1)
        if cost is not None:
            limit = cost.ms if isinstance(cost, LatencyBudget) else cost.limit_bytes / 1e6
            ax.axvline(limit, color="tab:red", ls="--", lw=1)
        ax.set_ylabel(
            {"perplexity": "perplexity increase (%)", "kl": "KL (nats/token)", "top1": "top-1 agreement (%)"}[
                quality.measure
            ]
            if quality
            else "average bits per weight"
        )
        ax.set_xlabel(f"{cost.measure} ms" if isinstance(cost, LatencyBudget) else "model size (MB)")
        ax.set_title(f"line {search.target.line}: {search.target.counting()} (labels)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"), ".png")
    plt.close(figure)
    return None
