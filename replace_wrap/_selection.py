"""Machinery of the whole-model policies: candidates with exact accounting, fits, and exact path solvers.

A candidate is a block that :func:`replace_wrap.convert` *would* replace if selected: not first or last of its
stack, and :func:`~replace_wrap.matching.match_block` finds tensors to synthesize. Its accounting is the
conversion's own (``BlockMatch.params_saved`` and the rule's scalar count), so an estimate built from
candidates equals the report of the conversion.

Selections are independent sets on paths: two candidates conflict when they are consecutive blocks of one
stack. The solvers below are exact dynamic programs over the candidates in stack order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import ReplaceConfig
from .fusion import Fit, fit_coefficients
from .graph import Stack
from .hooks import SITE_ATTR
from .matching import BlockMatch, Ownership, match_block
from .rules import get_rule

__all__ = [
    "Candidate",
    "block_fits",
    "candidates",
    "max_weight_independent",
    "min_cost_cover",
    "relative_residual",
    "trainable_count",
]

# Largest number of savings units the budget DP keeps per state; beyond it savings are rounded down to a
# coarser unit (still feasible, optimal to within need/_UNITS parameters).
_UNITS = 4096


@dataclass
class Candidate:
    """A block that convert would replace if selected, with what replacing it changes."""

    stack: int  # position of its stack in the analysis
    index: int  # position in the stack
    path: str
    match: BlockMatch = field(repr=False)
    saved: int  # trainable parameters removed
    scalars: int  # trainable scalars added

    @property
    def net(self) -> int:
        """Trainable parameters saved net of the scalars added."""
        return self.saved - self.scalars


def trainable_count(model: nn.Module) -> int:
    """Trainable parameters of ``model``, counted as :class:`~replace_wrap.ConversionReport` counts them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def candidates(stacks: Sequence[Stack], model: nn.Module, cfg: ReplaceConfig) -> list[Candidate]:
    """Every replaceable block of every stack, in stack order, with the conversion's exact accounting."""
    owners = Ownership(model)
    rule = get_rule(cfg.rule)
    out = []
    for si, stack in enumerate(stacks):
        for i in range(1, len(stack) - 1):
            block = stack.modules[i]
            if SITE_ATTR in block._modules or hasattr(block, SITE_ATTR):
                continue  # convert would skip it
            m = match_block(
                block, stack.modules[i - 1], stack.modules[i + 1], stack.paths[i], stack.paths[i - 1],
                stack.paths[i + 1], owners,
            )
            if m.problem:
                continue
            n_sets = len(m.fused) if cfg.scalars == "tensor" else 1
            scalars = sum(t.numel() for t in rule.init_params(n_sets, cfg.init).values())
            out.append(Candidate(si, i, stack.paths[i], m, m.params_saved, scalars))
    return out


def adjacency(cands: Sequence[Candidate]) -> list[bool]:
    """``adjacent[j]``: candidate ``j`` conflicts with candidate ``j - 1`` (consecutive blocks of one stack)."""
    return [
        j > 0 and c.stack == cands[j - 1].stack and c.index == cands[j - 1].index + 1 for j, c in enumerate(cands)
    ]


def block_fits(match: BlockMatch, n_sets: int, affine: bool) -> list[Fit]:
    """Least-squares ``(a, b)`` of a block's tensors against its neighbours': one joint fit, or one per tensor."""
    own = [t.leaf._parameters[t.name] for t in match.fused]
    prev = [getattr(t.prev_leaf, t.name) for t in match.fused]
    nxt = [getattr(t.next_leaf, t.name) for t in match.fused]
    # A neighbour tensor of another shape (adapted by the synthesis, not by this fit) explains nothing here:
    # it is left out of a joint fit, and a per-tensor fit reads it as unexplained (relative residual 1).
    same = [o.shape == p.shape == n.shape for o, p, n in zip(own, prev, nxt)]
    with torch.no_grad():
        if n_sets == 1:
            if not any(same):
                return [_unexplained(own)]
            pick = [k for k, ok in enumerate(same) if ok]
            fit = fit_coefficients(
                [own[k] for k in pick], [prev[k] for k in pick], [nxt[k] for k in pick], affine=affine
            )
            rest = _unexplained([o for o, ok in zip(own, same) if not ok])
            return [Fit(fit.a, fit.b, fit.residual + rest.residual, fit.norm + rest.norm)]
        return [
            fit_coefficients(o, p, n, affine=affine) if ok else _unexplained([o])
            for o, p, n, ok in zip(own, prev, nxt, same)
        ]


def _unexplained(tensors: Sequence[torch.Tensor]) -> Fit:
    norm = sum(float(t.detach().double().square().sum()) for t in tensors) if tensors else 0.0
    return Fit(0.5, 0.5, norm, norm)


def relative_residual(fits: Sequence[Fit]) -> float:
    """``sqrt(sum residual / sum ||target||^2)`` over fits: how far the block is from any neighbour mix."""
    return Fit(0.0, 0.0, sum(f.residual for f in fits), sum(f.norm for f in fits)).relative


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
    f0 = np.full(size + 1, inf)
    f0[0] = 0.0
    f1 = np.full(size + 1, inf)
    history = []
    for s, c, adj in zip(steps, costs, adjacent):
        base = f0 if adj else np.minimum(f0, f1)
        take = np.full(size + 1, inf)
        if s <= 0:
            take = base + c
        elif s >= size:
            take[size] = base.min() + c
        else:
            take[s:size] = base[: size - s] + c
            take[size] = base[size - s :].min() + c
        history.append((f0, f1))
        f0, f1 = np.minimum(f0, f1), take
    if not math.isfinite(min(f0[size], f1[size])):
        return None
    chosen = []
    state, u = (0 if f0[size] <= f1[size] else 1), size
    for j in range(len(steps) - 1, -1, -1):
        p0, p1 = history[j]
        if state == 1:
            chosen.append(j)
            base = p0 if adjacent[j] else np.minimum(p0, p1)
            s = steps[j]
            if s <= 0:
                pass
            elif u < size:
                u -= s
            else:  # capped: the predecessor is the cheapest state that reached the cap
                lo = max(size - s, 0)
                u = lo + int(np.argmin(base[lo:]))
            state = 0 if adjacent[j] or p0[u] <= p1[u] else 1
        else:
            state = 0 if p0[u] <= p1[u] else 1
    return sorted(chosen)
