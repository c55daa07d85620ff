"""The weight-synthesis maths as pure tensor functions.

Nothing here knows about modules or policies, so each function can be property-tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["Fit", "fit_coefficients", "mix"]


def mix(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor) -> torch.Tensor:
    """Synthesize ``a * prev + b * next``.

    The coefficients are fp32 scalars (0-d tensors) whatever the weights' dtype; they are cast to the weights'
    dtype so the result has the dtype of ``prev`` (bf16 weights give a bf16 tensor, gradients still reach the
    fp32 scalars through the cast).

    Args:
        a: Coefficient of ``prev``, a 0-d tensor (or of shape ``(1,)`` when ``prev`` has dimensions).
        b: Coefficient of ``next``, of the shape of ``a``.
        prev: The tensor of the previous block.
        next: The same tensor of the next block, of the same shape.

    Returns:
        A tensor of the shape and dtype of ``prev``.

    Example:
        >>> mix(torch.tensor(0.5), torch.tensor(0.5), torch.ones(2), torch.zeros(2))
        tensor([0.5000, 0.5000])
    """
    # shape: prev, next: S ; a, b: () -> S
    # Two passes over the weights (a * prev, then next * b accumulated in place) instead of three; the
    # in-place step is autograd-safe: mul saves its inputs, not its output.
    dtype = prev.dtype
    if a.dtype != dtype:  # no cast op at all when the dtypes agree (this runs per layer and step)
        a, b = a.to(dtype), b.to(dtype)
    if prev.shape != next.shape:  # broadcasting sides: the in-place step could not take next's shape
        return a * prev + b * next
    return (prev * a).addcmul_(next, b)


class Fit(NamedTuple):
    """Result of :func:`fit_coefficients`.

    Attributes:
        a: Coefficient of ``prev`` (a Python float).
        b: Coefficient of ``next``.
        residual: ``sum ||target - a*prev - b*next||^2`` over the tensors (>= 0).
        norm: ``sum ||target||^2`` over the tensors.
    """

    a: float
    b: float
    residual: float
    norm: float

    @property
    def relative(self) -> float:
        """``sqrt(residual / norm)``: 0 for an exact mix; at most 1 for an unconstrained fit (``a = b = 0``
        is always a candidate). A zero target is fitted exactly by ``a = b = 0``, so it reads 0."""
        if self.norm <= 0.0:
            return 0.0 if self.residual <= 0.0 else math.inf
        return math.sqrt(max(self.residual, 0.0) / self.norm)


def fit_coefficients(
    target: torch.Tensor | Sequence[torch.Tensor],
    prev: torch.Tensor | Sequence[torch.Tensor],
    next: torch.Tensor | Sequence[torch.Tensor],
    *,
    affine: bool = False,
) -> Fit:
    """Least-squares ``(a, b)`` so that ``a * prev + b * next`` is closest to ``target``, in closed form.

    Given lists, one pair is fitted jointly over all tensors (the sums of squares add up), which is the fit
    for one scalar set per block; fit tensor by tensor for one set per tensor. Computed in float64. When
    ``prev`` and ``next`` are linearly dependent the minimum-norm solution is returned (equal tensors give
    ``a == b``), so the fit is symmetric under swapping ``prev`` and ``next``.

    Args:
        target: The replaced block's tensor(s).
        prev: The previous block's tensor(s), same shapes.
        next: The next block's tensor(s), same shapes.
        affine: Constrain ``a + b = 1`` (for rules that can only express convex/affine mixes).

    Returns:
        A :class:`Fit` with ``a``, ``b``, the residual and the target's squared norm.

    Example:
        >>> p, n = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> f = fit_coefficients(0.25 * p + 2.0 * n, p, n)
        >>> round(f.a, 6), round(f.b, 6), f.relative
        (0.25, 2.0, 0.0)
    """
    ts, ps, ns = _as_list(target), _as_list(prev), _as_list(next)
    if not (len(ts) == len(ps) == len(ns)) or not ts:
        raise ValueError(f"fit_coefficients needs equally many tensors, got {len(ts)}, {len(ps)}, {len(ns)}")
    pp = pn = nn_ = pt = nt = tt = 0.0
    for t, p, n in zip(ts, ps, ns):
        if not (t.shape == p.shape == n.shape):
            raise ValueError(
                f"shapes differ: target {tuple(t.shape)}, prev {tuple(p.shape)}, next {tuple(n.shape)}"
            )
        # shape: any S -> flat (numel,), float64 for the sums of squares of large tensors
        t, p, n = (_flat64(x) for x in (t, p, n))
        pp += float(p @ p)
        pn += float(p @ n)
        nn_ += float(n @ n)
        pt += float(p @ t)
        nt += float(n @ t)
        tt += float(t @ t)
    if affine:
        # target - next = a * (prev - next): one unknown
        dd = pp - 2 * pn + nn_
        a = (pt - nt - pn + nn_) / dd if dd > _EPS * max(pp + nn_, _TINY) else 0.5
        b = 1.0 - a
    else:
        a, b = _solve_2x2(pp, pn, nn_, pt, nt)
    # Computed directly rather than expanded from the sums above: the expansion cancels catastrophically
    # for near-exact mixes, and the relative residual (a square root) would magnify that.
    residual = 0.0
    for t, p, n in zip(ts, ps, ns):
        t, p, n = (_flat64(x) for x in (t, p, n))
        residual += float((t - a * p - b * n).square().sum())
    return Fit(float(a), float(b), float(residual), float(tt))


_EPS = 1e-12  # relative singularity threshold of the normal equations
_TINY = 1e-300


def _solve_2x2(pp: float, pn: float, nn_: float, pt: float, nt: float) -> tuple[float, float]:
    """Minimum-norm solution of ``[[pp, pn], [pn, nn]] @ (a, b) = (pt, nt)`` (a Gram system, PSD)."""
    scale = max(pp, nn_, _TINY)
    det = pp * nn_ - pn * pn
    if det > _EPS * scale * scale:
        return (nn_ * pt - pn * nt) / det, (pp * nt - pn * pt) / det
    # Rank <= 1: prev and next are parallel (or zero). The system is G = v v^T with v = (|p|, +-|n|);
    # the minimum-norm solution of v v^T x = r is x = v (v.r) / |v|^4, restricted to the range of G.
    if pp + nn_ <= _TINY:
        return 0.0, 0.0
    # v is the leading eigenvector of G scaled by sqrt(eigenvalue); eigenvalue = pp + nn (trace)
    lam = pp + nn_
    v1, v2 = math.sqrt(pp), math.copysign(math.sqrt(nn_), pn) if pn != 0 else math.sqrt(nn_)
    proj = (v1 * pt + v2 * nt) / (lam * lam)
    return v1 * proj, v2 * proj


def _flat64(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1)
    if x.device.type == "mps":  # no float64 there
        x = x.cpu()
    return x.double()


def _as_list(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)
