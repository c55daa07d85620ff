"""Properties of the shape-adapting maps (replace_wrap.synthesis.adapt): shape, identity, linearity, slice/pad semantics."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import reference_adapt
from replace_wrap.synthesis.adapt import ShapeAdapter, adapt, adapt_pair, offset

dims = st.integers(min_value=1, max_value=4)
sizes = st.integers(min_value=1, max_value=6)


@st.composite
def shape_pairs(draw):
    """(source shape, target shape, centre dims) of equal rank."""
    n = draw(dims)
    src = tuple(draw(sizes) for _ in range(n))
    tgt = tuple(draw(sizes) for _ in range(n))
    centre = tuple(d for d in range(n) if draw(st.booleans()))
    return src, tgt, centre


def elementwise_reference(t: torch.Tensor, shape, centre) -> torch.Tensor:
    """Entry by entry: target[i] = source[i - offset] where that index exists, else 0."""
    out = torch.zeros(shape, dtype=t.dtype)
    offs = [offset(s, m, d in centre) for d, (s, m) in enumerate(zip(t.shape, shape))]
    for idx in itertools.product(*(range(m) for m in shape)):
        src = tuple(i - o for i, o in zip(idx, offs))
        if all(0 <= j < s for j, s in zip(src, t.shape)):
            out[idx] = t[src]
    return out


@settings(max_examples=150, deadline=None)
@given(shape_pairs())
def test_result_has_target_shape_dtype_device(case):
    src, tgt, centre = case
    t = torch.randn(src, dtype=torch.float64)
    out = adapt(t, tgt, centre)
    assert tuple(out.shape) == tgt
    assert out.dtype == t.dtype and out.device == t.device


@settings(max_examples=100, deadline=None)
@given(shape_pairs())
def test_slice_and_pad_semantics(case):
    """Every target entry is the aligned source entry, or zero where the source has none."""
    src, tgt, centre = case
    t = torch.randn(src)
    expected = elementwise_reference(t, tgt, set(centre))
    assert torch.equal(adapt(t, tgt, centre), expected)
    assert torch.equal(reference_adapt(t, tgt, centre), expected)  # the oracle of the contract tests agrees


@settings(max_examples=50, deadline=None)
@given(st.lists(sizes, min_size=1, max_size=4), st.data())
def test_identity_when_shapes_match(shape, data):
    t = torch.randn(shape)
    centre = tuple(data.draw(st.sets(st.integers(0, len(shape) - 1))))
    assert adapt(t, tuple(shape), centre) is t  # no copy, no new tensor


@settings(max_examples=100, deadline=None)
@given(shape_pairs(), st.floats(-3, 3), st.floats(-3, 3))
def test_linear(case, a, b):
    """adapt(a x + b y) == a adapt(x) + b adapt(y): synthesis stays a*adapt(prev) + b*adapt(next)."""
    src, tgt, centre = case
    x, y = torch.randn(src, dtype=torch.float64), torch.randn(src, dtype=torch.float64)
    lhs = adapt(a * x + b * y, tgt, centre)
    rhs = a * adapt(x, tgt, centre) + b * adapt(y, tgt, centre)
    torch.testing.assert_close(lhs, rhs)


@settings(max_examples=100, deadline=None)
@given(shape_pairs())
def test_pad_then_crop_round_trips(case):
    """Growing to the larger shape and shrinking back gives the original (no entry moves)."""
    src, tgt, centre = case
    big = tuple(max(s, m) for s, m in zip(src, tgt))
    t = torch.randn(src)
    assert torch.equal(adapt(adapt(t, big, centre), src, centre), t)


@settings(max_examples=100, deadline=None)
@given(shape_pairs())
def test_gradient_is_the_reverse_map(case):
    """The adjoint of a crop is the pad back (and vice versa): the gradient of <adapt(x), g> is adapt(g)."""
    src, tgt, centre = case
    x = torch.randn(src, dtype=torch.float64, requires_grad=True)
    g = torch.randn(tgt, dtype=torch.float64)
    (adapt(x, tgt, centre) * g).sum().backward()
    torch.testing.assert_close(x.grad, adapt(g, src, centre))


def test_crop_only_is_a_view():
    t = torch.randn(8, 4, 5, 5)
    out = adapt(t, (4, 4, 3, 3), centre=(2, 3))
    assert out._base is t  # a view: nothing allocated
    assert torch.equal(out, t[:4, :, 1:4, 1:4])


def test_centre_alignment_of_kernels():
    k3 = torch.arange(9.0).reshape(1, 1, 3, 3)
    k5 = adapt(k3, (1, 1, 5, 5), centre=(2, 3))
    assert torch.equal(k5[0, 0, 1:4, 1:4], k3[0, 0]) and k5.abs().sum() == k3.abs().sum()
    assert torch.equal(adapt(k5, (1, 1, 3, 3), centre=(-2, -1)), k3)  # negative dims count from the end
    # channel dims align at the start: the first channels are kept
    assert torch.equal(adapt(torch.arange(6.0), (4,)), torch.arange(4.0))


def test_rank_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"cannot adapt a 2-d tensor of shape \(2, 3\) to 1-d \(3,\)"):
        adapt(torch.zeros(2, 3), (3,))


def test_adapter_describe_and_call():
    ad = ShapeAdapter((8, 4, 5, 5), (4, 8, 3, 3), centre=(2, 3))
    assert ad.describe() == "slice dim 0 8->4, zero-pad dim 1 4->8, crop dims 2,3 5->3 centred"
    assert ad(torch.randn(8, 4, 5, 5)).shape == (4, 8, 3, 3)
    assert ShapeAdapter((5, 5), (3, 3), centre=(-1,)).centre == (1,)
    with pytest.raises(ValueError, match="differ in rank"):
        ShapeAdapter((5,), (3, 3))
    absent = ShapeAdapter(None, (4,))
    assert absent.absent and absent.describe() == "absent: zeros"
    with pytest.raises(ValueError, match="absent side"):
        absent(torch.zeros(4))


def test_adapt_pair_absent_side_gives_zeros_like_the_present_side():
    prev = torch.randn(6, dtype=torch.float64)
    p, n = adapt_pair(prev, None, ShapeAdapter((6,), (4,)), ShapeAdapter(None, (4,)))
    assert torch.equal(p, prev[:4]) and torch.equal(n, torch.zeros(4, dtype=torch.float64))
    p, n = adapt_pair(None, prev, ShapeAdapter(None, (6,)), None)  # next already has the target shape
    assert n is prev and torch.equal(p, torch.zeros_like(prev))
    with pytest.raises(ValueError, match="both sides are absent"):
        adapt_pair(None, None, ShapeAdapter(None, (2,)), ShapeAdapter(None, (2,)))
