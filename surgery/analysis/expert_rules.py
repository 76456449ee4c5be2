"""The rules for pruning and merging experts, written once for `check`, the plan and the passes.

They need only counts (experts per layer, an expert's width, the hidden size), so `check`
decides them from the config before any weight is loaded, the plan decides them again for
layers whose split is chosen by importance, and the passes' contracts hold to the same rules.
"""

from __future__ import annotations

import math


def full_rank(hidden: int, intermediate: int) -> int:
    """The largest rank an expert's weights can have: gate/up are (2I x hidden), down is (hidden x I)."""
    return min(hidden, intermediate)


def merge_rank(full: int, rank: int | None, rank_percent: float | None) -> int | None:
    """The rank a merge truncates to: as given, or the share of the full rank (rounded, at least 1)."""
    if rank_percent is not None:
        return max(1, math.floor(full * rank_percent / 100 + 0.5))
    return rank


def rank_problem(full: int, rank: int) -> str | None:
    """Why a merged expert cannot be truncated to `rank`, or None."""
    if 1 <= rank < full:
        return None
    return f"rank {rank} is not below the experts' full rank {full}"


def prune_problem(experts: int, keep: int) -> str | None:
    """Why a layer of `experts` experts cannot keep `keep` of them, or None."""
    if 1 <= keep < experts:
        return None
    return f"keeping {keep} experts of {experts} prunes nothing or everything"


def merge_problem(experts: int, groups: int) -> str | None:
    """Why a layer of `experts` experts cannot be merged into `groups`, or None."""
    if 1 <= groups <= experts:
        return None
    return f"cannot merge {experts} experts into {groups}"
