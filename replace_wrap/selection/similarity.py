"""Similarity: for pretrained weights, replace the blocks their neighbours explain best, starting from the fit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..analysis.discovery import Stack, analyse
from ..config import ReplaceConfig, current_config, using_config
from ..errors import PolicyError
from ..surgery.fits import block_fits, fitted_scalars, relative_residual
from ..surgery.matching import BlockMatch
from ..surgery.plan import Candidate, candidates, scalar_sets, trainable_count
from ..synthesis.rules import get_rule
from ._solvers import adjacency, max_weight_independent, min_cost_cover
from .budget import Budget, as_sets, solve_budget
from .policies import Every, Policy, Scalars

__all__ = ["Similarity"]


class Similarity(Policy):
    """Replace the blocks whose weights are closest to a mix of their neighbours', and start from that mix.

    For every replaceable block, ``(a, b)`` is fitted in closed form: the least-squares solution of the
    block's own tensors against ``a * t_prev + b * t_next``, over all its synthesized tensors jointly
    (``scalars="block"``) or tensor by tensor (``scalars="tensor"``); with a rule that can only express
    ``a + b = 1`` (``convex``) the fit is constrained to it. Blocks are ranked by the fit's relative residual
    ``||t - a t_prev - b t_next|| / ||t||`` (0: the block *is* a mix of its neighbours), the best-fitting ones
    are replaced (never first, last or adjacent; an exact dynamic program per stack), and each replaced
    block's scalars start at its fit instead of the config's ``init``, so the converted model starts close to
    the pretrained one. Meant for trained weights: on a fresh initialisation neighbours are unrelated and the
    fit is near ``a = b = 0``.

    How many blocks (one of these; the default is ``every=2``):

    - ``every=k``: per stack, as many blocks as ``Every(k)`` would replace, chosen by fit.
    - ``count=c``: per stack, ``c`` blocks (fewer if the stack cannot hold ``c`` non-adjacent ones).
    - ``trainable=f``: the whole model's trainable fraction at most ``f``, as :class:`~replace_wrap.Budget`
      with ``prefer="redundancy"`` (raises :class:`~replace_wrap.BudgetError` if unreachable).

    ``threshold=r`` keeps only blocks whose relative residual is at most ``r``; alone, it replaces as many of
    those as the adjacency rule allows.

    Args:
        every: Per-stack count as ``Every(every)``.
        count: Per-stack count.
        threshold: Largest relative residual a replaced block may have, >= 0.
        trainable: Target trainable fraction in (0, 1].

    Example:
        >>> import torch, replace_wrap
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(5)])
        >>> with torch.no_grad():  # block 2 is exactly 0.3 * block 1 + 0.7 * block 3
        ...     for name in ("weight", "bias"):
        ...         _ = getattr(net[2], name).copy_(0.3 * getattr(net[1], name) + 0.7 * getattr(net[3], name))
        >>> rep = replace_wrap.plan(net, policy=replace_wrap.Similarity(count=1))
        >>> [b.index for b in rep.replaced], [round(v, 4) for v in rep.replaced[0].scalars["a"]]
        ([2], [0.3])
    """

    def __init__(
        self,
        every: int | None = None,
        *,
        count: int | None = None,
        threshold: float | None = None,
        trainable: float | None = None,
    ):
        options = (("every", every), ("count", count), ("trainable", trainable))
        given = [name for name, v in options if v is not None]
        if len(given) > 1:
            raise PolicyError(
                f"Similarity takes one of every=, count= or trainable=, got {' and '.join(given)}; "
                "combine with threshold= to also bound the fit residual"
            )
        if every is None and count is None and trainable is None and threshold is None:
            every = 2
        self._every = Every(every) if every is not None else None  # validates k
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise PolicyError(f"Similarity(count=...) must be an integer >= 1 (blocks per stack), got {count!r}")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0
        ):
            raise PolicyError(
                f"Similarity(threshold=...) is a relative residual, a number >= 0 (0: exact mixes only, "
                f"1: any block); got {threshold!r}"
            )
        if trainable is not None:
            Budget(trainable)  # same validation and message
        self.every, self.count, self.threshold, self.trainable = every, count, threshold, trainable

    # -- selection --------------------------------------------------------------------------------------

    def select_all(self, stacks: Sequence[Stack], model: nn.Module) -> list[set[int]]:
        cfg = current_config()
        cands = candidates(stacks, model, cfg)
        residuals = [_residual(c.match, cfg) for c in cands]
        if self.threshold is not None:
            keep = [r <= self.threshold for r in residuals]
            cands = [c for c, k in zip(cands, keep) if k]
            residuals = [r for r, k in zip(residuals, keep) if k]
        costs = [r + 1e-9 for r in residuals]  # > 0, so no block is taken for free beyond the count
        if self.trainable is not None:
            chosen = solve_budget(self.trainable, cands, costs, trainable_count(model), model, repr(self))
            return as_sets(chosen, len(stacks))
        chosen = []
        for si, stack in enumerate(stacks):
            mine = [(c, cost) for c, cost in zip(cands, costs) if c.stack == si]
            chosen += _pick(mine, self._count_for(stack))
        return as_sets(chosen, len(stacks))

    def _count_for(self, stack: Stack) -> int | None:
        if self._every is not None:
            return len(self._every.indices(len(stack)))
        return self.count  # None: as many as allowed (threshold only)

    # -- initial scalars --------------------------------------------------------------------------------

    def initial_scalars(self, stack: Stack, index: int, match: BlockMatch, n_sets: int) -> Scalars:
        return fitted_scalars(match, n_sets, current_config().rule)

    # -- inspection -------------------------------------------------------------------------------------

    def scores(
        self, model: nn.Module, config: ReplaceConfig | None = None, **analyse_options: Any
    ) -> dict[str, float]:
        """Relative fit residual of every replaceable block, by path (lower: better explained by neighbours).

        Args:
            model: The model (not converted).
            config: The config whose ``rule`` and ``scalars`` shape the fit; the default config if omitted.
            **analyse_options: ``example_inputs=``/``trace=`` as for :func:`replace_wrap.plan`.
        """
        cfg = config or ReplaceConfig()
        stacks = analyse(model, **analyse_options).stacks
        with using_config(cfg):
            return {c.path: _residual(c.match, cfg) for c in candidates(stacks, model, cfg)}

    def __repr__(self) -> str:
        parts = [
            f"{k}={v!r}" for k, v in (
                ("every", self.every), ("count", self.count), ("trainable", self.trainable),
                ("threshold", self.threshold),
            ) if v is not None
        ]
        return f"Similarity({', '.join(parts)})"


def _residual(match: BlockMatch, cfg: ReplaceConfig) -> float:
    return relative_residual(block_fits(match, scalar_sets(match, cfg), get_rule(cfg.rule).affine))


def _pick(items: list[tuple[Candidate, float]], count: int | None) -> list[Candidate]:
    """The ``count`` cheapest non-adjacent candidates of one stack (as many as possible if fewer fit)."""
    if not items:
        return []
    cands = [c for c, _ in items]
    costs = [cost for _, cost in items]
    adjacent = adjacency(cands)
    most = len(max_weight_independent([1.0] * len(cands), adjacent))
    need = most if count is None else min(count, most)
    picked = min_cost_cover([1] * len(cands), costs, adjacent, need)
    return [cands[j] for j in picked or []]
