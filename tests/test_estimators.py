"""The default scalar-gradient estimator (``ab_grad_sample="auto"``): the sampling rule, unbiasedness and the
variance it states, for linear layers (rows) and convolutions (output positions of every batch item, gathered
patches). Oracles are per-unit terms computed with plain ``F.linear`` / ``F.conv*`` in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from replace_wrap.synthesis import estimators
from replace_wrap.synthesis.estimators import AUTO_FRACTION, AUTO_MIN_UNITS, sample_size
from replace_wrap.synthesis.kernels import mixed_conv, mixed_linear
from replace_wrap.synthesis.patches import gather_at, gather_patches, grouped_product, locate

pytestmark = pytest.mark.usefixtures("one_thread")
D64 = torch.float64


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 100_000))
def test_auto_rule(n):
    m = sample_size(n, "auto")
    # the rule as documented: exact when N <= M, else max(M, ceil(N * f)) units
    want = n if n <= AUTO_MIN_UNITS else max(AUTO_MIN_UNITS, math.ceil(n * AUTO_FRACTION))
    assert m == min(want, n)
    assert sample_size(n, None) == n
    assert sample_size(n, 0.25) == min(n, max(1, math.ceil(n * 0.25)))


def _draws(fn, n: int) -> torch.Tensor:
    torch.manual_seed(1234)
    return torch.stack([torch.stack(fn()) for _ in range(n)])  # shape: (draws, 2) for (dL/da, dL/db)


def _check_estimator(draws: torch.Tensor, exact: torch.Tensor, terms: torch.Tensor, m: int) -> None:
    """Unbiased (mean within 4 standard errors of the exact sums) and of the stated variance.

    ``terms``: (N, 2) per-unit terms of (dL/da, dL/db). Sampling m of N without replacement and rescaling by
    N/m has variance N^2 (1/m - 1/N) S^2 (S^2 the terms' variance); the documented bound is N^2 S^2 / M.
    """
    n = terms.shape[0]
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert (draws.std(0) > 0).all(), "the estimator does not vary: it is not sampling"
    z = (mean - exact).abs() / se
    assert (z < 4).all(), f"biased: mean {mean.tolist()} vs exact {exact.tolist()} (z = {z.tolist()})"
    torch.testing.assert_close(terms.sum(0), exact, rtol=1e-6, atol=1e-6)  # the oracle's terms add up
    var = n**2 * (1 / m - 1 / n) * terms.var(0)
    assert (var <= n**2 * terms.var(0) / AUTO_MIN_UNITS + 1e-9).all()  # the documented bound
    ratio = draws.var(0) / var  # the sample variance of D draws: relative sd ~ sqrt(2 / D)
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), f"variance {draws.var(0).tolist()} vs stated {var.tolist()}"


@pytest.mark.parametrize("host", [True, False], ids=["host-scalars", "device-scalars"])
@pytest.mark.parametrize("bias_kind", ["own", "mixed"])
def test_auto_linear_unbiased_with_the_stated_variance(host, bias_kind, monkeypatch):
    if not host:  # the accelerator route (no host read of a, b) runs on CPU tensors too when told to
        monkeypatch.setattr("replace_wrap.synthesis.kernels.scalars_on_host", lambda t: False)
    g = torch.Generator().manual_seed(3)
    n, d_in, d_out = 400, 12, 6
    x = torch.randn(n, d_in, generator=g, dtype=D64)
    prev, nxt = torch.randn(d_out, d_in, generator=g, dtype=D64), torch.randn(d_out, d_in, generator=g, dtype=D64)
    bp, bn = torch.randn(d_out, generator=g, dtype=D64), torch.randn(d_out, generator=g, dtype=D64)
    dy = x @ (prev + nxt).T + 0.5 * torch.randn(n, d_out, generator=g, dtype=D64)

    def grads(sample):
        a = torch.tensor(0.7, dtype=D64, requires_grad=True)
        b = torch.tensor(-0.4, dtype=D64, requires_grad=True)
        if bias_kind == "mixed":
            y = mixed_linear(x, a, b, prev, nxt, bias_mix=(bp, bn), sample=sample)
        else:
            y = mixed_linear(x, a, b, prev, nxt, 3 * bp, sample=sample)
        return list(torch.autograd.grad(y, [a, b], dy))

    # oracle: per-row terms <dy_i, x_i W^T (+ b)> with plain F.linear
    mixed = bias_kind == "mixed"
    terms = torch.stack([
        (dy * F.linear(x, prev, bp if mixed else None)).sum(1), (dy * F.linear(x, nxt, bn if mixed else None)).sum(1)
    ], 1)
    exact = torch.stack(grads(None))
    m = sample_size(n, "auto")
    assert m == AUTO_MIN_UNITS < n
    _check_estimator(_draws(lambda: grads("auto"), 400), exact, terms, m)


def test_auto_is_exact_on_small_layers():
    x, w = torch.randn(AUTO_MIN_UNITS, 5, dtype=D64), torch.randn(3, 5, dtype=D64)
    a = torch.tensor(0.3, dtype=D64, requires_grad=True)
    dy = torch.randn(AUTO_MIN_UNITS, 3, dtype=D64)
    first = torch.autograd.grad(mixed_linear(x, a, a, w, 2 * w, sample="auto"), a, dy)[0]
    for _ in range(3):  # N <= M: every row, every time
        assert torch.equal(torch.autograd.grad(mixed_linear(x, a, a, w, 2 * w, sample="auto"), a, dy)[0], first)
    torch.testing.assert_close(first, (dy * (x @ (3 * w).T)).sum())


GEOMETRIES = {  # dims, stride, padding, dilation, groups, channels in, channels out, kernel
    "2d-3x3-pad": (2, (1, 1), (1, 1), (1, 1), 1, 4, 6, 3),
    "2d-stride2-dilated-grouped": (2, (2, 1), (2, 1), (2, 1), 2, 4, 6, 3),
    "2d-depthwise": (2, (1, 1), (1, 1), (1, 1), 4, 4, 8, 3),
    "2d-1x1": (2, (1, 1), (0, 0), (1, 1), 1, 5, 3, 1),
    "1d": (1, (2,), (1,), (1,), 1, 3, 4, 3),
    "3d": (3, (1, 2, 1), (1, 0, 1), (1, 1, 1), 1, 2, 3, 3),
}


def _conv(dims):
    return (F.conv1d, F.conv2d, F.conv3d)[dims - 1]


def _conv_case(name, batch=6):
    dims, stride, padding, dilation, groups, cin, cout, k = GEOMETRIES[name]
    size = {1: 25, 2: 7, 3: 5}[dims]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, cin, *([size] * dims), generator=g, dtype=D64)
    wshape = (cout, cin // groups, *([k] * dims))
    prev, nxt = torch.randn(wshape, generator=g, dtype=D64), torch.randn(wshape, generator=g, dtype=D64)
    geom = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, prev, nxt, geom, dims


@pytest.mark.parametrize("cache", [True, False], ids=["table", "computed"])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_patches_are_what_the_convolution_reads(name, cache):
    x, prev, _, geom, dims = _conv_case(name)
    y = _conv(dims)(x, prev, **geom)
    units = torch.randperm(y.shape[0] * math.prod(y.shape[2:]))[:40]
    where = locate(units, tuple(y.shape[2:]))
    patches = gather_patches(x, where, tuple(prev.shape[2:]), geom["stride"], geom["padding"], geom["dilation"],
                             tuple(y.shape[2:]), cache=cache)
    assert patches.shape == (units.numel(), x.shape[1] * math.prod(prev.shape[2:]))  # m x C*k^d: never the whole input
    # the layer's product on the patches is the convolution's output at those positions
    torch.testing.assert_close(grouped_product(geom["groups"])(patches, prev), gather_at(y, where))
    if dims == 2 and geom["groups"] == 1:  # and, in 2d, exactly the columns of F.unfold (im2col)
        cols = F.unfold(x, prev.shape[2:], dilation=geom["dilation"], padding=geom["padding"], stride=geom["stride"])
        n, pos = where  # flat output positions, row-major: the columns' order
        torch.testing.assert_close(patches, cols[n, :, pos])


@pytest.mark.parametrize("name", ["2d-3x3-pad", "2d-stride2-dilated-grouped", "2d-1x1"])
def test_patches_of_a_channels_last_or_strided_input_are_the_same(name):
    # The gathers index the input with its spatial dimensions merged (a view for channels-last tensors), or per
    # dimension for layouts whose spatial dimensions do not merge (a spatially transposed view, a crop): the
    # same values.
    x, prev, _, geom, dims = _conv_case(name)
    y = _conv(dims)(x, prev, **geom)
    units = torch.randperm(y.shape[0] * math.prod(y.shape[2:]))[:40]
    where = locate(units, tuple(y.shape[2:]))
    args = (tuple(prev.shape[2:]), geom["stride"], geom["padding"], geom["dilation"], tuple(y.shape[2:]))
    expected = gather_patches(x, where, *args)
    swapped = x.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, W-major storage
    crop = torch.nn.functional.pad(x, (1, 2, 3, 0))[:, :, 3:, 1:-2]  # the same values, a view into a larger input
    for other in (x.contiguous(memory_format=torch.channels_last), swapped, crop):
        torch.testing.assert_close(gather_patches(other, where, *args), expected, rtol=0, atol=0)
    torch.testing.assert_close(gather_at(y.contiguous(memory_format=torch.channels_last), where), gather_at(y, where),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", ["2d-3x3-pad", "2d-stride2-dilated-grouped", "2d-depthwise", "1d", "3d"])
def test_auto_conv_samples_positions_unbiased_with_the_stated_variance(name):
    x, prev, nxt, geom, dims = _conv_case(name)
    conv = _conv(dims)
    y_p, y_n = conv(x, prev, **geom), conv(x, nxt, **geom)
    dy = y_p + y_n + 0.5 * torch.randn(y_p.shape, generator=torch.Generator().manual_seed(1), dtype=D64)

    def grads(sample):
        a = torch.tensor(0.6, dtype=D64, requires_grad=True)
        b = torch.tensor(0.3, dtype=D64, requires_grad=True)
        return list(torch.autograd.grad(mixed_conv(x, a, b, prev, nxt, sample=sample, **geom), [a, b], dy))

    # oracle: one term per (batch item, output position), summed over output channels
    terms = torch.stack([(dy * y_p).sum(1).reshape(-1), (dy * y_n).sum(1).reshape(-1)], 1)
    n = terms.shape[0]
    m = sample_size(n, "auto")
    assert m < n and n > x.shape[0]  # positions of every item are sampled, not whole items
    _check_estimator(_draws(lambda: grads("auto"), 300), torch.stack(grads(None)), terms, m)


def _saved(fn) -> list[torch.Tensor]:
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return kept, out


def test_sampled_conv_keeps_patches_or_the_input_never_an_unfold():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor(0.5, requires_grad=True)
    # a 1x1 convolution: the sampled patches (m x C) are a sliver of the input and are kept instead of it
    x = torch.randn(8, 16, 12, 12, generator=g)
    w = torch.randn(4, 16, 1, 1, generator=g)
    kept, _ = _saved(lambda: mixed_conv(x, a, a, w, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1), sample="auto"))
    m = sample_size(8 * 12 * 12, "auto")
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in kept)
    assert sorted(t.numel() for t in kept if t.dim() == 2) == [m * 4, m * 16]  # output and patches at m positions
    # a 3x3 convolution: m patches would be a ninth of... too many; the input itself is kept (no copy): in a CNN
    # the ReLU before it keeps it anyway. Nothing of the size of the unfolded input (9x the input) exists.
    w3 = torch.randn(4, 16, 3, 3, generator=g)
    kept, _ = _saved(lambda: mixed_conv(x, a, a, w3, w3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), sample="auto"))
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)
    assert max(t.numel() for t in kept) == x.numel()


def test_host_read_of_the_scalars_is_off_under_compile(monkeypatch):
    assert estimators.scalars_on_host(torch.tensor(1.0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not estimators.scalars_on_host(torch.tensor(1.0))  # a float() read would break the graph
