"""Exact solvers for whole-model selections: independent sets on the blocks of each stack.

Two candidates conflict when they are consecutive blocks of one stack (a replaced block needs real
neighbours), so a selection is an independent set on a path, and the solvers are dynamic programs over the
candidates in stack order. Pure functions of numbers: no model, no policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..surgery.plan import Candidate

__all__ = ["adjacency", "max_weight_independent", "min_cost_cover"]

# Largest number of savings units the budget DP keeps per state; beyond it savings are rounded down to a
# coarser unit (still feasible, optimal to within need/_UNITS parameters).
_UNITS = 4096


def adjacency(cands: Sequence[Candidate]) -> list[bool]:
    """``adjacent[j]``: candidate ``j`` conflicts with candidate ``j - 1`` (consecutive blocks of one stack)."""
    return [
        j > 0 and c.stack == cands[j - 1].stack and c.index == cands[j - 1].index + 1 for j, c in enumerate(cands)
    ]


def max_weight_independent(weights: Sequence[float], adjacent: Sequence[bool]) -> list[int]:
    """Indices of a maximum-weight set with no two adjacent members (only positive weights are taken).

    Example:
        >>> max_weight_independent([3, 4, 3], [False, True, True])
        [0, 2]
    """
    take, skip = -math.inf, 0.0  # best total of the prefix with its last item taken / not taken
    back: list[bool] = []  # back[j]: in the best prefix ending before j, was item j-1 taken?
    for w, adj in zip(weights, adjacent):
        best_prev = max(take, skip)
        back.append(take > skip)  # ties prefer fewer items
        take, skip = (skip if adj else best_prev) + w, best_prev
    chosen, state = [], take > skip
    for j in range(len(weights) - 1, -1, -1):
        if state:
            chosen.append(j)
            state = False if adjacent[j] else back[j]
        else:
            state = back[j]
    return sorted(chosen)


def min_cost_cover(
    weights: Sequence[int], costs: Sequence[float], adjacent: Sequence[bool], need: int, units: int = _UNITS
) -> list[int] | None:
    """Cheapest set, no two adjacent, whose weights sum to at least ``need``; ``None`` if none reaches it.

    Exact when the weights and ``need`` share a common unit that leaves at most ``units`` steps (as repeated
    stacks do: equal blocks save equal amounts); otherwise weights are rounded down to a coarser unit, which
    keeps every returned set feasible but may miss the optimum by that unit. Costs must be >= 0.

    Example:
        >>> min_cost_cover([5, 5, 5, 5], [1.0, 0.1, 1.0, 0.1], [False, True, True, True], need=10)
        [1, 3]
    """
    if need <= 0:
        return []
    ws = [int(w) for w in weights]
    unit = math.gcd(need, *[w for w in ws if w > 0]) if any(w > 0 for w in ws) else need
    if need // unit <= units:
        size = need // unit
        steps = [w // unit for w in ws]
    else:  # round down: a set whose rounded steps reach `units` really saves >= need
        size = units
        scale = need / units
        steps = [int(w // scale) for w in ws]
    inf = math.inf
    # f0[u] / f1[u]: cheapest cost of a prefix with u steps (capped at size) whose last item is skipped / taken
    f0 = torch.full((size + 1,), inf, dtype=torch.float64)
    f0[0] = 0.0
    f1 = torch.full((size + 1,), inf, dtype=torch.float64)
    history = []
    for s, c, adj in zip(steps, costs, adjacent):
        base = f0 if adj else torch.minimum(f0, f1)
        take = torch.full((size + 1,), inf, dtype=torch.float64)
        if s <= 0:
            take = base + c
        elif s >= size:
            take[size] = base.min() + c
        else:
            take[s:size] = base[: size - s] + c
            take[size] = base[size - s :].min() + c
        history.append((f0, f1))
        f0, f1 = torch.minimum(f0, f1), take
    if not math.isfinite(min(f0[size], f1[size])):
        return None
    chosen = []
    state, u = (0 if f0[size] <= f1[size] else 1), size
    for j in range(len(steps) - 1, -1, -1):
        p0, p1 = history[j]
        if state == 1:
            chosen.append(j)
            base = p0 if adjacent[j] else torch.minimum(p0, p1)
            s = steps[j]
            if s <= 0:
                pass
            elif u < size:
                u -= s
            else:  # capped: the predecessor is the cheapest state that reached the cap
                lo = max(size - s, 0)
                u = lo + int(torch.argmin(base[lo:]))
            state = 0 if adjacent[j] or p0[u] <= p1[u] else 1
        else:
            state = 0 if p0[u] <= p1[u] else 1
    return sorted(chosen)
