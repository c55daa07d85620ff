"""The lean-backward layers of replace_wrap.synthesis.kernels: exact gradients (gradcheck, and against plain autograd)
and an unbiased sampled estimator (a statistical test whose tolerance comes from the sample variance)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import replace_wrap
from replace_wrap.surgery.apply import sites
from replace_wrap.synthesis import kernels as mixed_ops
from replace_wrap.synthesis import lean_layers
from replace_wrap.synthesis.maths import mix
from replace_wrap.synthesis.estimators import check_sample, sample_units
from replace_wrap.synthesis.kernels import mixed_conv, mixed_linear

# The two ways of taking dL/da: thin row products (few rows) and one dW = dy^T x (many rows).
BRANCHES = {"row-products": 10**9, "weight-gradient": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=sorted(BRANCHES))
def branch(request, monkeypatch):
    monkeypatch.setattr(lean_layers, "ROW_PRODUCT_MAX", BRANCHES[request.param])
    return request.param


def _linear_inputs(coupled: bool, dtype=torch.float64, shape=(2, 3, 4), out=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    a = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    b = torch.tensor(-0.4, dtype=a.dtype, requires_grad=True)
    prev = torch.randn(out, shape[-1], generator=g, dtype=dtype, requires_grad=coupled)
    nxt = torch.randn(out, shape[-1], generator=g, dtype=dtype, requires_grad=coupled)
    bias = torch.randn(out, generator=g, dtype=dtype, requires_grad=True)
    return x, a, b, prev, nxt, bias


@pytest.mark.parametrize("coupled", [False, True], ids=["detached", "coupled"])
def test_linear_gradcheck(coupled, branch):
    inputs = _linear_inputs(coupled)
    assert torch.autograd.gradcheck(lambda *t: mixed_linear(*t), inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("coupled", [False, True], ids=["detached", "coupled"])
def test_linear_gradcheck_with_mixed_bias(coupled, branch):
    x, a, b, prev, nxt, _ = _linear_inputs(coupled)
    bp = torch.randn(5, dtype=torch.float64, requires_grad=coupled)
    bn = torch.randn(5, dtype=torch.float64, requires_grad=coupled)

    def fn(x, a, b, prev, nxt, bp, bn):
        return mixed_linear(x, a, b, prev, nxt, bias_mix=(bp, bn))

    assert torch.autograd.gradcheck(fn, (x, a, b, prev, nxt, bp, bn), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "dims, stride, padding, dilation, groups",
    [(1, (2,), (1,), (1,), 1), (2, (1, 2), (1, 0), (2, 1), 2), (2, (1, 1), (0, 0), (1, 1), 1)],
)
@pytest.mark.parametrize("coupled", [False, True], ids=["detached", "coupled"])
def test_conv_gradcheck(dims, stride, padding, dilation, groups, coupled):
    g = torch.Generator().manual_seed(0)
    cin, cout, k = 4, 2 * groups, 3
    x = torch.randn(2, cin, *([6] * dims), generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    wshape = (cout, cin // groups, *([k] * dims))
    prev = torch.randn(wshape, generator=g, dtype=torch.float64, requires_grad=coupled)
    nxt = torch.randn(wshape, generator=g, dtype=torch.float64, requires_grad=coupled)
    bias = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=True)
    bp = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=coupled)
    bn = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=coupled)

    def fn(x, a, b, prev, nxt, bias):
        return mixed_conv(x, a, b, prev, nxt, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    def fn_mixed_bias(x, a, b, prev, nxt, bp, bn):
        return mixed_conv(x, a, b, prev, nxt, stride=stride, padding=padding, dilation=dilation, groups=groups,
                          bias_mix=(bp, bn))

    assert torch.autograd.gradcheck(fn, (x, a, b, prev, nxt, bias), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(fn_mixed_bias, (x, a, b, prev, nxt, bp, bn), eps=1e-6, atol=1e-8)


def _plain_grads(y_fn, inputs, dy):
    y = y_fn(*inputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return y, torch.autograd.grad(y, wanted, dy)


@pytest.mark.parametrize("coupled", [False, True], ids=["detached", "coupled"])
def test_linear_matches_plain_autograd_fp32(coupled, branch):
    x, a, b, prev, nxt, bias = _linear_inputs(coupled, dtype=torch.float32, shape=(4, 9, 16), out=24)
    dy = torch.randn(4, 9, 24)
    ref_y, ref = _plain_grads(lambda x, a, b, p, n, bias: F.linear(x, mix(a, b, p, n), bias), (x, a, b, prev, nxt, bias), dy)
    y, got = _plain_grads(mixed_linear, (x, a, b, prev, nxt, bias), dy)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)  # same synthesized weight, same F.linear
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


def test_linear_under_cpu_autocast_matches_plain_autocast():
    x, a, b, prev, nxt, bias = _linear_inputs(False, dtype=torch.float32, shape=(3, 7, 16), out=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_y = F.linear(x, mix(a, b, prev, nxt), bias)
        y = mixed_linear(x, a, b, prev, nxt, bias)
    assert y.dtype == ref_y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref_y)
    dy = torch.randn_like(y)
    ref = torch.autograd.grad(ref_y, [x, a, b, bias], dy)
    got = torch.autograd.grad(y, [x, a, b, bias], dy)
    for r, g in zip(ref, got):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.05 * r.abs().max().item())


def test_conv_under_cpu_autocast_matches_plain_autocast():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    a, b = torch.tensor(0.7, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    prev, nxt = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    bias = torch.randn(4, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_y = F.conv2d(x, mix(a, b, prev, nxt), bias, padding=1)
        y = mixed_conv(x, a, b, prev, nxt, bias, stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    assert y.dtype == ref_y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref_y)
    dy = torch.randn_like(y)
    for r, got in zip(torch.autograd.grad(ref_y, [x, a, b, bias], dy), torch.autograd.grad(y, [x, a, b, bias], dy)):
        assert got.dtype == r.dtype
        torch.testing.assert_close(got, r, rtol=0.05, atol=0.05 * r.abs().max().item())


@pytest.mark.parametrize("sample", [None, "auto"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_inside_an_autocast_region_gives_the_gradients_of_one_outside(kind, sample):
    # loss.backward() inside `with torch.autocast(...)` (advised against, but common in training loops): the
    # layers' backward computes in the dtypes its forward chose, not recast by autocast (a bf16 product against
    # an fp32 output gradient raised in torch.dot)
    g = torch.Generator().manual_seed(5)
    if kind == "linear":  # 12 rows: within ROW_PRODUCT_MAX, the one-product route of the exact estimator
        x = torch.randn(12, 16, generator=g)
        prev, nxt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    else:
        x = torch.randn(4, 3, 9, 9, generator=g)
        prev, nxt = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    grads = []
    for inside in (True, False):
        a, b = torch.tensor(0.7, requires_grad=True), torch.tensor(0.2, requires_grad=True)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(0)  # the same sampled units both times
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind == "linear":
                y = mixed_linear(xi, a, b, prev, nxt, sample=sample)
            else:
                y = mixed_conv(xi, a, b, prev, nxt, stride=(1, 1), padding=(1, 1), dilation=(1, 1), sample=sample)
            loss = y.float().pow(2).sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append((xi.grad, a.grad, b.grad))
    for got, ref in zip(*grads):
        assert got.dtype == ref.dtype and torch.equal(got, ref)


def test_no_grad_path_is_plain_linear():
    x, a, b, prev, nxt, bias = _linear_inputs(False, dtype=torch.float32)
    with torch.no_grad():
        y = mixed_linear(x, a, b, prev, nxt, bias)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.linear(x, a * prev + b * nxt, bias).detach())


# --- the sampled estimator ---------------------------------------------------------------------------------


def _estimates(fn, n_draws: int) -> torch.Tensor:
    torch.manual_seed(1234)
    return torch.stack([torch.stack(fn()) for _ in range(n_draws)])  # shape: (draws, 2) for (dL/da, dL/db)


def _assert_unbiased(draws: torch.Tensor, exact: torch.Tensor) -> None:
    """|mean - exact| within 4 standard errors (two-sided false alarm ~6e-5 for a mean of many draws), and the
    same test must have the power to reject a 10% bias, or it would prove nothing."""
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert (draws.std(0) > 0).all(), "the estimator does not vary: it is not sampling"
    z = (mean - exact).abs() / se
    assert (z < 4).all(), f"biased: mean {mean.tolist()} vs exact {exact.tolist()} (z = {z.tolist()})"
    assert ((mean - 0.9 * exact).abs() / se > 4).all(), "too few draws to detect a 10% bias"


@pytest.fixture(params=["host-scalars", "device-scalars"])
def scalar_reads(request, monkeypatch):
    # the accelerator route (no host read of a, b) runs on CPU tensors too when told to
    if request.param == "device-scalars":
        monkeypatch.setattr(mixed_ops, "scalars_on_host", lambda t: False)
    return request.param


@pytest.mark.parametrize("fraction", [1 / 4, 1 / 16])
@pytest.mark.parametrize("ab, mixed_bias", [((0.6, 0.3), False), ((-0.2, 1.1), True)])
def test_sampled_linear_is_unbiased(fraction, ab, mixed_bias, scalar_reads):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 20, 12, generator=g, dtype=torch.float64)  # 160 rows
    prev, nxt = torch.randn(6, 12, generator=g, dtype=torch.float64), torch.randn(6, 12, generator=g, dtype=torch.float64)
    bias = 3 * torch.randn(6, generator=g, dtype=torch.float64)  # the estimator must take it out of x @ W^T
    # dy correlated with x @ W^T: every row adds to dL/da with the same sign, so the exact gradients are large
    # against the row-to-row noise and a 10% bias is detectable with a few hundred draws
    dy = x @ (prev + nxt).T + 0.1 * torch.randn(8, 20, 6, generator=g, dtype=torch.float64)

    def grads(sample, ab=ab):
        a = torch.tensor(ab[0], dtype=torch.float64, requires_grad=True)
        b = torch.tensor(ab[1], dtype=torch.float64, requires_grad=True)
        xx = x.clone().requires_grad_()
        if mixed_bias:  # the bias is mixed with the same scalars inside the layer: its share is sampled too
            y = mixed_linear(xx, a, b, prev, nxt, bias_mix=(0.1 * bias, -0.05 * bias), sample=sample)
        else:
            y = mixed_linear(xx, a, b, prev, nxt, bias, sample=sample)
        return torch.autograd.grad(y, [a, b, xx], dy)

    ga, gb, gx = grads(None)
    draws = _estimates(lambda: grads(fraction)[:2], 300)
    _assert_unbiased(draws, torch.stack([ga, gb]))
    torch.testing.assert_close(grads(fraction)[2], gx, rtol=0, atol=0)  # the input gradient is never sampled
    # the degenerate point a = b = 0 (W = 0, the output carries nothing): both still estimated without bias
    exact0 = torch.stack(list(grads(None, (0.0, 0.0))[:2]))
    _assert_unbiased(_estimates(lambda: grads(fraction, (0.0, 0.0))[:2], 300), exact0)


def test_sampled_mixed_bias_share_is_unbiased(scalar_reads):
    """Zero weights: the whole scalar gradient is the mixed bias's share, estimated from the sampled rows."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(160, 4, generator=g, dtype=torch.float64)
    zero = torch.zeros(3, 4, dtype=torch.float64)
    bp, bn = torch.rand(3, generator=g, dtype=torch.float64), -torch.rand(3, generator=g, dtype=torch.float64)
    dy = 1.0 + 0.3 * torch.randn(160, 3, generator=g, dtype=torch.float64)

    def grads(sample):
        a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
        y = mixed_linear(x, a, b, zero, zero, bias_mix=(bp, bn), sample=sample)
        return torch.autograd.grad(y, [a, b], dy)

    exact = torch.stack(list(grads(None)))
    torch.testing.assert_close(exact, torch.stack([dy.sum(0) @ bp, dy.sum(0) @ bn]))
    _assert_unbiased(_estimates(lambda: grads(1 / 8), 300), exact)


def test_sampled_conv_is_unbiased():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, 6, 6, generator=g, dtype=torch.float64)
    prev = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    nxt = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    dy = F.conv2d(x, prev + nxt, padding=1) + 0.1 * torch.randn(16, 4, 6, 6, generator=g, dtype=torch.float64)

    def grads(sample):
        a = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        y = mixed_conv(x, a, b, prev, nxt, stride=(1, 1), padding=(1, 1), dilation=(1, 1), sample=sample)
        return torch.autograd.grad(y, [a, b], dy)

    exact = torch.stack(list(grads(None)))
    _assert_unbiased(_estimates(lambda: grads(0.25), 300), exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sampled_grads_of_half_precision_weights_are_rescaled_in_fp32(dtype, kind):
    # The sampled sums come in the weights' dtype; times N/m they can exceed fp16's 65504 where the sums do not.
    # Same rows drawn (same seed) with the same values held in fp32: the half-precision result is finite and
    # agrees to the half-precision sums' own rounding.
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        x = torch.randn(200, 64, generator=g)
        w = torch.randn(2, 16, 64, generator=g)
        dy = 200 * torch.randn(200, 16, generator=g)
    else:
        x = torch.randn(2, 4, 20, 20, generator=g)
        w = torch.randn(2, 8, 4, 3, 3, generator=g)
        dy = 200 * torch.randn(2, 8, 20, 20, generator=g)

    def grads(dt):
        a = torch.tensor(0.7, requires_grad=True)
        b = torch.tensor(-0.3, requires_grad=True)
        xs, (wp, wn) = x.to(dt).requires_grad_(), w.to(dt)
        torch.manual_seed(1)
        if kind == "linear":
            y = mixed_linear(xs, a, b, wp, wn, sample="auto")
        else:
            y = mixed_conv(xs, a, b, wp, wn, stride=(1, 1), padding=(1, 1), dilation=(1, 1), sample="auto")
        return torch.stack(torch.autograd.grad(y, [a, b], dy.to(dt)))

    half, full = grads(dtype), grads(torch.float32)
    assert torch.isfinite(half).all() and full.abs().max() > 65504  # the rescaled gradient is beyond fp16
    torch.testing.assert_close(half, full, rtol=5e-2, atol=0)


def test_sampled_grads_stay_finite_when_the_larger_coefficient_is_subnormal():
    # The solve divides by the larger |coefficient|; with a subnormal one, scale / a overflows fp32 by itself.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 64, generator=g, requires_grad=True)
    prev, nxt = torch.randn(2, 16, 64, generator=g)
    a = torch.tensor(3e-39, requires_grad=True)
    b = torch.tensor(1e-40, requires_grad=True)
    y = mixed_linear(x, a, b, prev, nxt, sample="auto")
    ga, gb = torch.autograd.grad(y, [a, b], torch.randn(200, 16, generator=g))
    assert torch.isfinite(ga) and torch.isfinite(gb)


def test_sampled_conv_runs_on_meta_tensors():
    # Shapes only (meta init): the padded kernel's reads are computed, never read back to the host.
    x = torch.empty(2, 4, 9, 9, device="meta", requires_grad=True)
    a = torch.empty((), device="meta", requires_grad=True)
    b = torch.empty((), device="meta", requires_grad=True)
    prev = nxt = torch.empty(6, 4, 3, 3, device="meta")
    y = mixed_conv(x, a, b, prev, nxt, stride=(1, 1), padding=(1, 1), dilation=(1, 1), sample="auto")
    assert y.shape == (2, 6, 9, 9) and y.is_meta
    gx, ga = torch.autograd.grad(y, [x, a], torch.empty_like(y))
    assert gx.shape == x.shape and ga.shape == a.shape


def test_sample_one_is_exact_and_coupled_ignores_sampling():
    x, a, b, prev, nxt, bias = _linear_inputs(True, dtype=torch.float64, shape=(5, 40, 4))
    dy = torch.randn(5, 40, 5, dtype=torch.float64)
    ref = torch.autograd.grad(mixed_linear(x, a, b, prev, nxt, bias), [a, b, prev], dy)
    for sample in (1.0, 0.05):  # 1.0 means exact; coupled needs the full dW, so it stays exact
        got = torch.autograd.grad(mixed_linear(x, a, b, prev, nxt, bias, sample=sample), [a, b, prev], dy)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), f=st.floats(1e-3, 1.0))
def test_sample_rows_draws_distinct_rows_with_the_right_scale(n, f):
    rows, scale = sample_units(n, f, torch.device("cpu"))
    m = max(1, math.ceil(n * f))
    if m >= n:
        assert rows is None and scale == 1.0
    else:
        assert rows.numel() == m == len(set(rows.tolist())) and 0 <= rows.min() and rows.max() < n
        assert scale == pytest.approx(n / m)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, True, "0.1", float("nan")])
def test_check_sample_rejects(bad):
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\]"):
        check_sample(bad)


@pytest.mark.parametrize("shape", [(5, 3), (2, 5, 3), (1, 2, 5, 3)])
def test_linear_output_can_be_modified_in_place(shape):
    """F.linear with a bias returns a view for inputs of more than two dimensions; the kernel's output must still
    take in-place ops (an inplace ReLU after a linear, as in Swin-v2's position-bias MLP) with exact gradients."""
    x = torch.randn(shape, requires_grad=True)
    wp, wn, bias = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4)
    a, b = torch.tensor(0.3, requires_grad=True), torch.tensor(0.6, requires_grad=True)
    y = mixed_ops.mixed_linear(x, a, b, wp, wn, bias)
    torch.relu_(y).sum().backward()
    grads = (x.grad, a.grad, b.grad)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    torch.relu(x2 @ (a2 * wp + b2 * wn).T + bias).sum().backward()  # the same function, plain autograd
    for got, want in zip(grads, (x2.grad, a2.grad, b2.grad)):
        torch.testing.assert_close(got, want)


def test_hf_swinv2_with_windows_of_two_trains():
    """The configuration that failed (issue 11, defect 10): Swin-v2's position-bias MLP ends in an inplace ReLU."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=24, depths=[2, 2, 6, 2], num_heads=[2, 2, 2, 2], window_size=2,
        num_labels=3,
    )
    model = replace_wrap.convert(transformers.Swinv2ForImageClassification(cfg), every=2)
    model(pixel_values=torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert all(s.a.grad is not None for _, _, s in sites(model))


def test_layers_of_every_layout_share_one_scratch_buffer_and_compute_exactly():
    # One flat scratch buffer per dtype, as large as the largest weight, serves layers of any memory layout
    # (contiguous, a transposed HF Conv1D-style view, a channels_last convolution weight; a layout that is
    # not dense, a strided slice, is made contiguous there). Each layer's output and gradients are those of plain autograd on
    # the mixed weight, whatever ran before it in the same buffer.
    torch.manual_seed(0)
    a = torch.tensor(0.3, requires_grad=True)
    b = torch.tensor(-0.8, requires_grad=True)
    big = (torch.randn(48, 40), torch.randn(48, 40))
    small = (torch.randn(5, 40), torch.randn(5, 40))
    transposed = (torch.randn(40, 12).t(), torch.randn(40, 12).t())  # (12, 40) stored as (40, 12)
    strided = (torch.randn(12, 80)[:, ::2], torch.randn(12, 80)[:, ::2])  # not dense: contiguous in the scratch
    conv = tuple(torch.randn(6, 40, 3, 3).to(memory_format=torch.channels_last) for _ in range(2))
    lean_layers._SCRATCH.__dict__.pop("flat", None)
    lean_layers._SCRATCH.__dict__.pop("views", None)
    for prev, nxt in (small, big, transposed, strided, small, big):
        x = torch.randn(7, 40, requires_grad=True)
        dy = torch.randn(7, prev.shape[0])
        ref_y, ref = _plain_grads(lambda x, a, b: F.linear(x, a * prev + b * nxt), (x, a, b), dy)
        y, got = _plain_grads(lambda x, a, b: mixed_linear(x, a, b, prev, nxt, sample=None), (x, a, b), dy)
        torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 40, 5, 5, requires_grad=True)
    dy = torch.randn(2, 6, 5, 5)
    geo = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    ref_y, ref = _plain_grads(lambda x, a, b: F.conv2d(x, a * conv[0] + b * conv[1], padding=1), (x, a, b), dy)
    y, got = _plain_grads(lambda x, a, b: mixed_conv(x, a, b, *conv, sample=None, **geo), (x, a, b), dy)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    buffers = lean_layers._SCRATCH.flat
    assert list(buffers) == [torch.float32]  # one buffer, not one per layout
    cl_crop = torch.randn(6, 40, 3, 3).to(memory_format=torch.channels_last)[:, :20]  # not dense, channels-last
    for t in (small[0], big[0], transposed[0], strided[0], conv[0], cl_crop):  # laid out as empty_like lays it out
        view = lean_layers._scratch_like(t)
        assert view.stride() == torch.empty_like(t).stride()
        # in the one buffer: the views made before it grew (small's) were made again in the grown one
        assert view.untyped_storage().data_ptr() == buffers[torch.float32].untyped_storage().data_ptr()
    assert buffers[torch.float32].numel() == max(48 * 40, 6 * 40 * 9)
