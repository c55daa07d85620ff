"""Least-squares fits of a candidate block against its neighbours: the redundancy score of the policies."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..surgery.matching import BlockMatch
from ..synthesis.maths import Fit, fit_coefficients

__all__ = ["block_fits", "relative_residual"]


def block_fits(match: BlockMatch, n_sets: int, affine: bool) -> list[Fit]:
    """Least-squares ``(a, b)`` of a block's tensors against its neighbours': one joint fit, or one per tensor."""
    own = [t.layer._parameters[t.name] for t in match.synthesized]
    with torch.no_grad():
        # The neighbours as the synthesis sees them: tensors of another shape sliced / zero-padded to the
        # block's, an absent side as zeros. The maps are linear, so this fit is the synthesis' own.
        sources = [t.sources() for t in match.synthesized]
        prev = [p for p, _ in sources]
        nxt = [n for _, n in sources]
        if n_sets == 1:
            return [fit_coefficients(own, prev, nxt, affine=affine)]
        return [fit_coefficients(o, p, n, affine=affine) for o, p, n in zip(own, prev, nxt)]


def relative_residual(fits: Sequence[Fit]) -> float:
    """``sqrt(sum residual / sum ||target||^2)`` over fits: how far the block is from any neighbour mix."""
    return Fit(0.0, 0.0, sum(f.residual for f in fits), sum(f.norm for f in fits)).relative
