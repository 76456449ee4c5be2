"""Which counts a search measures: every one (exhaustive), or bisection on the budgets that get
harder as the count grows, `parallel` probes a round; and how many that is, for its progress."""

from __future__ import annotations

import math
from collections.abc import Callable

from surgery.search.results import Candidate


def largest_fitting(search: str, maximum: int, parallel: int, harder: bool, run: Callable[[list[int]], None],
                    measured: dict[int, Candidate], bounded: Callable[[int], bool]) -> Candidate | None:  # fmt: skip
    """The fitting candidate with the largest count. `run(counts)` measures counts into
    `measured`; `bounded(count)` says whether a measured count keeps the budgets that get harder
    with the count (`harder`: there are some; without them the largest count is tried first)."""
    if search == "exhaustive":
        run(list(range(maximum + 1)))
        fitting = [c for c in measured.values() if c.fits]
        return max(fitting, key=lambda c: c.count) if fitting else None
    low, high = -1, maximum + 1  # bounded(low) holds (or low = -1); bounded(high) fails (or high = max + 1)
    if not harder:
        run([maximum])
        low = maximum
    while high - low > 1:
        inner = high - low - 1
        probes = sorted({low + max(1, round((i + 1) * (inner + 1) / (parallel + 1))) for i in range(parallel)})
        probes = [p for p in probes if low < p < high] or [low + 1]
        run(probes)
        for probe in probes:
            if bounded(probe):
                low = max(low, probe)
        high = min([p for p in probes if p > low and not bounded(p)] + [high])
    return measured[low] if low >= 0 and measured[low].fits else None


def candidates_expected(search: str, maximum: int, parallel: int, harder: bool) -> int:
    """About how many candidates a search measures: every count (exhaustive), or `parallel` a
    round for the rounds bisection needs over maximum + 1 counts."""
    if search == "exhaustive":
        return maximum + 1
    rounds = math.ceil(math.log(maximum + 2) / math.log(parallel + 1)) if maximum >= 0 else 0
    return parallel * rounds + (0 if harder else 1)
