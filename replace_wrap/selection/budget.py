"""Budget: replace as little as needed to bring the trainable-parameter fraction under a target."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..analysis.discovery import Stack
from ..config import current_config
from ..errors import BudgetError, PolicyError
from ..surgery.fits import block_fits, relative_residual
from ..surgery.plan import Candidate, candidates, trainable_count
from ..synthesis.rules import get_rule
from ._solvers import adjacency, max_weight_independent, min_cost_cover
from .policies import Policy, PolicyLike, as_policy

__all__ = ["Budget", "as_sets", "solve_budget"]

_PREFER = ("savings", "redundancy")


class Budget(Policy):
    """Choose blocks so that at most a fraction ``trainable`` of the model's trainable parameters remain.

    The fraction is the conversion's own: ``report.trainable_after / report.trainable_before``, where a
    replaced block removes exactly the tensors :func:`replace_wrap.convert` synthesizes (tensors shared with
    other modules, or frozen, save nothing) and adds the rule's scalars (2 per set for ``linear``, more with
    ``scalars="tensor"`` or other rules). Blocks are never first, last or adjacent; the choice spans all
    stacks at once (a whole-model policy).

    Among the selections that meet the target, the cheapest is taken (an exact dynamic program over each
    stack, a path, with the budget shared across stacks):

    - ``prefer="savings"``: cost 1 per replaced block, so as few blocks as possible, and among those the ones
      that save the most.
    - ``prefer="redundancy"``: for trained weights. A block's cost is its relative least-squares residual
      against the best mix of its neighbours (see :func:`replace_wrap.synthesis.maths.fit_coefficients`): the budget is
      met by replacing the blocks its neighbours already explain best. :class:`~replace_wrap.Similarity` with
      ``trainable=`` does the same and also starts each block's scalars from the fit.

    Args:
        trainable: Target fraction in (0, 1].
        prefer: ``"savings"`` or ``"redundancy"``.
        candidates: Optional policy restricting which blocks may be chosen (e.g. ``Pattern(...)``). Use it
            rather than ``Budget(...) & other``: an intersection after the fact no longer meets the budget.

    Raises:
        BudgetError: (at ``convert``/``plan``) If no allowed selection reaches the target; the message and
            ``best_fraction`` give the lowest fraction that is reachable.

    Example:
        >>> import torch, replace_wrap
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(9)])
        >>> rep = replace_wrap.plan(net, policy=replace_wrap.Budget(trainable=0.7))
        >>> [b.index for b in rep.replaced], rep.trainable_ratio <= 0.7
        ([1, 3, 5], True)
    """

    def __init__(self, trainable: float, *, prefer: str = "savings", candidates: PolicyLike | None = None):
        if isinstance(trainable, bool) or not isinstance(trainable, (int, float)) or not 0.0 < trainable <= 1.0:
            raise PolicyError(
                f"Budget(trainable=...) is the target fraction of trainable parameters, a number in (0, 1]; "
                f"got {trainable!r} (e.g. Budget(trainable=0.5) keeps at most half)"
            )
        if prefer not in _PREFER:
            raise PolicyError(f"Budget(prefer=...) must be one of {', '.join(map(repr, _PREFER))}; got {prefer!r}")
        self.trainable = float(trainable)
        self.prefer = prefer
        self.candidates = as_policy(candidates) if candidates is not None else None

    def select_all(self, stacks: Sequence[Stack], model: nn.Module) -> list[set[int]]:
        cfg = current_config()
        cands = _allowed(candidates(stacks, model, cfg), self.candidates, stacks, model)
        if self.prefer == "redundancy":
            affine = get_rule(cfg.rule).affine
            costs = [
                relative_residual(block_fits(c.match, c.n_sets, affine)) + 1e-9
                for c in cands
            ]
        else:
            # 1 per block; the tie-break (< 1 in total) prefers the blocks that save the most
            top = max((c.net for c in cands), default=1)
            costs = [1.0 + (1.0 - c.net / top) / (len(cands) + 1) for c in cands]
        chosen = solve_budget(self.trainable, cands, costs, trainable_count(model), model, repr(self))
        return as_sets(chosen, len(stacks))

    def __repr__(self) -> str:
        extra = f", prefer={self.prefer!r}" if self.prefer != "savings" else ""
        extra += f", candidates={self.candidates!r}" if self.candidates is not None else ""
        return f"Budget(trainable={self.trainable:g}{extra})"


def solve_budget(
    target: float, cands: list[Candidate], costs: list[float], before: int, model: nn.Module, who: str
) -> list[Candidate]:
    """The cheapest candidates (no two adjacent) that bring ``after / before`` to at most ``target``."""
    useful = [(c, cost) for c, cost in zip(cands, costs) if c.net > 0]  # a block saving nothing never helps
    cands = [c for c, _ in useful]
    costs = [cost for _, cost in useful]
    limit = math.floor(target * before + 1e-9 * before)  # trainable_after must be an integer <= target * before
    need = before - limit
    if need <= 0:
        return []
    adjacent = adjacency(cands)
    best = [cands[j] for j in max_weight_independent([c.net for c in cands], adjacent)]
    best_saving = sum(c.net for c in best)
    if best_saving < need:
        best_fraction = (before - best_saving) / before if before else 1.0
        shown = math.ceil(best_fraction * 10_000) / 10_000  # rounded up, so passing it back is reachable
        blocks = ", ".join(c.path for c in best[:4]) + (", ..." if len(best) > 4 else "")
        how = f"by replacing {len(best)} block(s) ({blocks})" if best else "since no block of it can be replaced"
        raise BudgetError(
            f"{who}: a trainable fraction of {target:g} is unreachable for {type(model).__name__}; the best "
            f"reachable is {shown:.4f}, {how}: the first and last block of each stack, a real neighbour "
            f"between replaced blocks and the parameters outside the stacks stay trainable. Use "
            f"trainable={shown:.4f} or higher.",
            best_fraction=best_fraction,
        )
    picked = min_cost_cover([c.net for c in cands], costs, adjacent, need)
    return best if picked is None else [cands[j] for j in picked]


def _allowed(
    cands: list[Candidate], restrict: Policy | None, stacks: Sequence[Stack], model: nn.Module
) -> list[Candidate]:
    if restrict is None:
        return cands
    allowed = restrict.select_all(stacks, model)
    return [c for c in cands if c.index in allowed[c.stack]]


def as_sets(chosen: list[Candidate], n_stacks: int) -> list[set[int]]:
    out: list[set[int]] = [set() for _ in range(n_stacks)]
    for c in chosen:
        out[c.stack].add(c.index)
    return out
