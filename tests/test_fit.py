"""Properties of the closed-form least-squares fit behind Similarity (replace_wrap.synthesis.maths.fit_coefficients)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replace_wrap.synthesis.maths import Fit, fit_coefficients

coef = st.floats(-3, 3, allow_nan=False, allow_infinity=False)
seeds = st.integers(0, 2**31 - 1)
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


def _tensors(seed: int, shape: tuple[int, ...], n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _brute_residual(t, p, n, a, b) -> float:
    ts, ps, ns = (x if isinstance(x, list) else [x] for x in (t, p, n))
    return sum(float((ti - a * pi - b * ni).double().square().sum()) for ti, pi, ni in zip(ts, ps, ns))


@settings(max_examples=60, deadline=None)
@given(a=coef, b=coef, seed=seeds, shape=shapes)
def test_exact_mix_is_recovered(a, b, seed, shape):
    p, n, _ = _tensors(seed, shape)
    if p.numel() < 2:  # one number cannot separate a from b; recovery of the value is checked below
        n = torch.cat([n.flatten(), torch.ones(1, dtype=n.dtype)])
        p = torch.cat([p.flatten(), torch.zeros(1, dtype=p.dtype)])
    fit = fit_coefficients(a * p + b * n, p, n)
    gram = torch.stack([p.flatten(), n.flatten()])
    if torch.linalg.matrix_rank(gram) == 2 and torch.linalg.cond(gram @ gram.T) < 1e6:
        assert fit.a == pytest.approx(a, abs=1e-6) and fit.b == pytest.approx(b, abs=1e-6)
    assert fit.relative == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, shape=shapes, k=st.integers(1, 3))
def test_residual_is_the_least_squares_minimum(seed, shape, k):
    ts, ps, ns = [], [], []
    for i in range(k):
        t, p, n = _tensors(seed + i, shape)
        ts.append(t), ps.append(p), ns.append(n)
    fit = fit_coefficients(ts, ps, ns)
    assert fit.residual >= 0.0
    assert fit.residual == pytest.approx(_brute_residual(ts, ps, ns, fit.a, fit.b), rel=1e-6, abs=1e-9)
    assert 0.0 <= fit.relative <= 1.0 + 1e-12  # a = b = 0 is always a candidate
    # no nearby (a, b) does better: the normal equations hold
    for da, db in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        assert _brute_residual(ts, ps, ns, fit.a + da, fit.b + db) >= fit.residual - 1e-9


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes, c=st.floats(0.1, 10), s=st.floats(0.1, 10))
def test_invariances(seed, shape, c, s):
    t, p, n = _tensors(seed, shape)
    base = fit_coefficients(t, p, n)
    scaled = fit_coefficients(c * t, p, n)  # target scale scales both coefficients
    assert scaled.a == pytest.approx(c * base.a, rel=1e-6, abs=1e-9)
    assert scaled.b == pytest.approx(c * base.b, rel=1e-6, abs=1e-9)
    assert scaled.relative == pytest.approx(base.relative, rel=1e-6, abs=1e-9)
    swapped = fit_coefficients(t, n, p)  # swapping neighbours swaps the coefficients
    assert (swapped.a, swapped.b) == pytest.approx((base.b, base.a), rel=1e-6, abs=1e-9)
    prev_scaled = fit_coefficients(t, s * p, n)
    assert prev_scaled.relative == pytest.approx(base.relative, rel=1e-6, abs=1e-9)
    gram = torch.stack([p.flatten(), n.flatten()])
    if t.numel() >= 2 and torch.linalg.cond(gram @ gram.T) < 1e6:  # unique solution (not the min-norm one)
        # rescaling a neighbour rescales its coefficient only
        assert prev_scaled.a == pytest.approx(base.a / s, rel=1e-5, abs=1e-9)
        assert prev_scaled.b == pytest.approx(base.b, rel=1e-5, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes)
def test_joint_fit_equals_fit_of_concatenation(seed, shape):
    t1, p1, n1 = _tensors(seed, shape)
    t2, p2, n2 = _tensors(seed + 1, (3,))
    joint = fit_coefficients([t1, t2], [p1, p2], [n1, n2])
    flat = fit_coefficients(*(torch.cat([x.flatten(), y]) for x, y in ((t1, t2), (p1, p2), (n1, n2))))
    assert joint == pytest.approx(flat, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(a=st.floats(-2, 2), seed=seeds, shape=shapes)
def test_affine_fit(a, seed, shape):
    t, p, n = _tensors(seed, shape)
    exact = fit_coefficients(a * p + (1 - a) * n, p, n, affine=True)
    assert exact.a == pytest.approx(a, abs=1e-6) and exact.a + exact.b == pytest.approx(1.0)
    free, constrained = fit_coefficients(t, p, n), fit_coefficients(t, p, n, affine=True)
    assert constrained.a + constrained.b == pytest.approx(1.0)
    assert constrained.residual >= free.residual - 1e-9  # a constraint never fits better


def test_degenerate_neighbours():
    p = torch.tensor([1.0, 2.0, 3.0])
    fit = fit_coefficients(p, p, p)  # equal neighbours: the minimum-norm, symmetric solution
    assert fit.a == pytest.approx(0.5) and fit.b == pytest.approx(0.5) and fit.relative == pytest.approx(0.0)
    fit = fit_coefficients(p, 2 * p, -p)  # parallel neighbours of opposite sign
    assert 2 * fit.a - fit.b == pytest.approx(1.0) and fit.relative == pytest.approx(0.0, abs=1e-9)
    zero = torch.zeros(3)
    assert fit_coefficients(p, zero, zero) == Fit(0.0, 0.0, pytest.approx(14.0), pytest.approx(14.0))
    assert fit_coefficients(zero, p, 2 * p).relative == 0.0
    assert fit_coefficients(p, p, p, affine=True).a == pytest.approx(0.5)
    assert math.isfinite(fit_coefficients(p.half(), p.half(), zero.half()).a)  # low precision in, float64 sums


def test_errors():
    with pytest.raises(ValueError, match="equally many tensors, got 2, 1, 1"):
        fit_coefficients([torch.ones(2)] * 2, [torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match=r"shapes differ: target \(2,\), prev \(3,\)"):
        fit_coefficients(torch.ones(2), torch.ones(3), torch.ones(2))
