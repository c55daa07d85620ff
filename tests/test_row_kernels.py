"""The row kernel of replaced RMS norms: which classes it serves, that it computes the layer's own output and input
gradient, that its sampled scalar gradient is unbiased with the stated variance (oracle: per-row terms in float64
from plain arithmetic), and where it declines to the generic path."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

import replace_wrap
from replace_wrap.synthesis import row_kernels

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 1e-6


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(row_kernels, "_ROW_WISE", {})  # each test sees every class's first call


class MyRMSNorm(nn.Module):
    """A user's RMS norm, served by its name: computes in float64 internally, as some models do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.double()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * self.weight


class Declared(MyRMSNorm):
    kernel_layer_name = "RMSNorm"  # what transformers' @use_kernel_forward_from_hub("RMSNorm") sets


class BatchRMSNorm(nn.Module):
    """Named an RMS norm but normalizing over the batch: not row-wise."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + EPS) * self.weight


def _norm(kind: str, d: int) -> nn.Module:
    return {
        "torch": lambda: nn.RMSNorm(d, eps=EPS),
        "named": lambda: MyRMSNorm(d),
        "declared": lambda: Declared(d),
        "batch": lambda: BatchRMSNorm(d),
    }[kind]()


class Block(nn.Module):
    def __init__(self, kind: str, d: int) -> None:
        super().__init__()
        self.norm = _norm(kind, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(x)


def _net(kind: str = "torch", d: int = 8, blocks: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(*[Block(kind, d) for _ in range(blocks)])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(1.0, 0.5)  # distinct neighbours, so the two scalars' gradients differ
    return net


def _routes(model: nn.Module) -> dict[str, tuple[str, str]]:
    return {r.layer: (r.route, r.estimator) for b in replace_wrap.report(model).replaced for r in b.layers}


AUTO_ROWS = "sampled: m = max(16, N/64) of N rows (tokens), exact when m >= N"


@pytest.mark.parametrize("kind, layer", [("torch", "RMSNorm"), ("named", "MyRMSNorm"), ("declared", "Declared")])
def test_rms_norms_by_type_name_or_declaration_take_the_row_kernel(kind, layer):
    routes = _routes(replace_wrap.convert(_net(kind), every=2))
    assert routes == {layer: ("kernel 'rms_norm'", AUTO_ROWS)}


@pytest.mark.parametrize(
    "options, why",
    [
        ({"ab_grad_sample": None}, "kernel 'rms_norm' only samples and ab_grad_sample=None"),
        ({"neighbour_grad": "coupled"},
         "kernel 'rms_norm' only samples and neighbour_grad='coupled' needs the full weight gradient"),
        ({"fast_path": False}, "fast_path=False"),
    ],
)
def test_where_the_row_kernel_does_not_apply_the_report_says_generic_and_why(options, why):
    routes = _routes(replace_wrap.convert(_net(), every=2, **options))
    assert routes == {"RMSNorm": ("generic", f"exact (autograd): {why}")}


def _taps(monkeypatch) -> list[int]:
    calls: list[int] = []
    apply = row_kernels._RowTap.apply
    monkeypatch.setattr(row_kernels._RowTap, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    return calls


@pytest.mark.parametrize("kind", ["torch", "named", "declared"])
def test_output_and_every_other_gradient_are_the_generic_paths(kind, monkeypatch):
    taps = _taps(monkeypatch)
    base = _net(kind)
    fast = replace_wrap.convert(copy.deepcopy(base), every=2)
    slow = replace_wrap.convert(copy.deepcopy(base), every=2, fast_path=False)
    x, w = torch.randn(4, 16, 8), torch.randn(4, 16, 8)
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, ys = fast(xf), slow(xs)
    assert torch.equal(yf, ys)  # the layer's own forward on the same synthesized values: bitwise
    (yf * w).sum().backward()
    (ys * w).sum().backward()
    assert taps == [1]
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-6, atol=1e-6)
    for name in ("0.norm.weight", "2.norm.weight"):  # the neighbours: their own gradients only (detached)
        torch.testing.assert_close(fast.get_parameter(name).grad, slow.get_parameter(name).grad)
    site = fast[1].replacement
    assert site.a.grad is not None and site.b.grad is not None


def _rms(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)


def _row_terms(net: nn.Sequential, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-row terms of (dL/da, dL/db) of block 1, in float64 from plain arithmetic: (N, 2)."""
    w0 = net[0].norm.weight.detach().double()
    w2 = net[2].norm.weight.detach().double()
    a, b = (float(t) for t in (net[1].replacement.a, net[1].replacement.b))
    h0 = x.double()
    h1 = h0 + _rms(h0) * w0
    y1 = (h1 + _rms(h1) * (a * w0 + b * w2)).requires_grad_()
    loss = ((y1 + _rms(y1) * w2) * w.double()).sum()
    (g,) = torch.autograd.grad(loss, y1)  # dL/d(block 1's output): only block 2 lies after it
    # d(output)/da at row i is rms(h1)_i * w0 (the residual does not depend on a): the per-row term
    terms = [(g * _rms(h1) * side).reshape(-1, x.shape[-1]).sum(-1) for side in (w0, w2)]
    return torch.stack(terms, -1)


@pytest.mark.parametrize("kind", ["torch", "named"])
def test_sampled_scalar_gradient_is_unbiased_with_the_stated_variance(kind):
    net = replace_wrap.convert(_net(kind), every=2)
    x, w = torch.randn(4, 32, 8), torch.randn(4, 32, 8)  # 128 rows: 16 sampled
    terms = _row_terms(net, x, w)
    exact = terms.sum(0)
    torch.manual_seed(7)
    draws = []
    for _ in range(2000):
        net.zero_grad()
        (net(x) * w).sum().backward()
        draws.append(torch.stack([net[1].replacement.a.grad.double(), net[1].replacement.b.grad.double()]).reshape(2))
    d = torch.stack(draws)
    n, m = terms.shape[0], 16
    assert (d.std(0) > 0).all(), "the estimate does not vary: it is not sampling"
    z = (d.mean(0) - exact).abs() / (d.std(0) / math.sqrt(d.shape[0]))
    assert (z < 4).all(), f"biased: {d.mean(0).tolist()} vs {exact.tolist()}"
    stated = n**2 * (1 / m - 1 / n) * terms.var(0)  # sampling m of N rows without replacement, rescaled N/m
    ratio = d.var(0) / stated
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), f"variance {d.var(0).tolist()} vs stated {stated.tolist()}"


def test_few_rows_and_exact_settings_take_the_generic_path_and_are_exact(monkeypatch):
    taps = _taps(monkeypatch)
    for options, x in (({}, torch.randn(2, 8, 8)), ({"ab_grad_sample": None}, torch.randn(4, 32, 8))):
        net = replace_wrap.convert(_net(), every=2, **options)
        w = torch.randn_like(x)
        (net(x) * w).sum().backward()
        exact = _row_terms(net, x, w).sum(0).float()
        got = torch.stack([net[1].replacement.a.grad, net[1].replacement.b.grad]).reshape(2)
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)
    assert taps == []


def test_output_may_be_modified_in_place_afterwards(monkeypatch):
    taps = _taps(monkeypatch)
    class Scaled(Block):
        def forward(self, x):
            y = self.norm(x)
            y.mul_(2.0)  # in place on the norm's output: allowed, and its gradient follows
            return x + y

    torch.manual_seed(0)
    base = nn.Sequential(*[Scaled("torch", 8) for _ in range(3)])
    fast = replace_wrap.convert(copy.deepcopy(base), every=2)
    slow = replace_wrap.convert(copy.deepcopy(base), every=2, fast_path=False)
    x = torch.randn(4, 32, 8)
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast(xf).square().sum().backward()
    slow(xs).square().sum().backward()
    assert taps == [1]
    torch.testing.assert_close(xf.grad, xs.grad)


def test_a_forward_that_unpacks_its_input_shape_is_served(monkeypatch):
    class ShapedRMSNorm(MyRMSNorm):
        def forward(self, x):
            b, t, d = x.shape  # rows are handed over as (m, 1, d): the input's number of dimensions
            return super().forward(x.reshape(b * t, d)).reshape(b, t, d)

    taps = _taps(monkeypatch)
    torch.manual_seed(0)
    conv = replace_wrap.convert(nn.Sequential(*[_shaped(ShapedRMSNorm) for _ in range(3)]), every=2)
    x = torch.randn(4, 32, 8)
    conv(x).square().sum().backward()
    assert taps == [1] and conv[1].replacement.a.grad.abs() > 0


def _shaped(cls):
    block = Block("named", 8)
    block.norm = cls(8)
    return block


def test_a_neighbour_modified_in_place_before_the_backward_is_refused_as_autograd_would():
    net = replace_wrap.convert(_net(), every=2)
    y = net(torch.randn(4, 32, 8)).square().sum()
    with torch.no_grad():
        net[0].norm.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_a_users_kernel_for_their_rms_norm_class_wins_over_the_declared_match():
    from replace_wrap.synthesis import layer_kernels

    class OwnRMSNorm(MyRMSNorm):
        pass

    calls = []

    @replace_wrap.register_layer_kernel(OwnRMSNorm, name="test_own_rms_norm")
    def own(layer, x):
        calls.append(1)
        return NotImplemented

    try:
        net = replace_wrap.convert(nn.Sequential(*[_shaped(OwnRMSNorm) for _ in range(3)]), every=2)
        assert _routes(net)["OwnRMSNorm"][0] == "kernel 'test_own_rms_norm'"
        net(torch.randn(4, 32, 8)).sum().backward()
        assert calls == [1]
        assert layer_kernels.kernel_for(MyRMSNorm, ("weight",)).name == "rms_norm"  # by its name
    finally:
        layer_kernels._KERNELS[:] = [k for k in layer_kernels._KERNELS if k.name != "test_own_rms_norm"]
        layer_kernels._LOOKUP.clear()


def test_a_class_named_rms_norm_that_is_not_row_wise_is_found_out_and_stays_exact(caplog, monkeypatch):
    taps = _taps(monkeypatch)
    net = replace_wrap.convert(_net("batch"), every=2)
    ref = replace_wrap.convert(_net("batch"), every=2, fast_path=False)
    x = torch.randn(64, 8)
    with caplog.at_level(logging.WARNING, logger="replace_wrap"):
        net(x).square().sum().backward()
    assert "BatchRMSNorm is not row-wise" in caplog.text
    ref(x).square().sum().backward()
    assert taps == []
    torch.testing.assert_close(net[1].replacement.a.grad, ref[1].replacement.a.grad)


def test_recompute_replays_the_same_sample(monkeypatch):
    taps = _taps(monkeypatch)
    x, w = torch.randn(4, 32, 8), torch.randn(4, 32, 8)
    grads = []
    for recompute in (False, True):
        net = replace_wrap.convert(_net(), every=2, recompute=recompute)
        torch.manual_seed(3)
        (net(x) * w).sum().backward()
        grads.append(torch.stack([net[1].replacement.a.grad, net[1].replacement.b.grad]))
    assert len(taps) == 3  # once, then the checkpointed forward and its recomputation
    torch.testing.assert_close(grads[0], grads[1])
    exact = _row_terms(net, x, w).sum(0).float()
    assert not torch.allclose(grads[0].reshape(2), exact, rtol=1e-4, atol=1e-4)  # a sample, not every row


def test_under_autocast_the_output_is_the_layers_and_the_scalars_get_a_gradient(monkeypatch):
    taps = _taps(monkeypatch)
    base = _net("torch")
    fast = replace_wrap.convert(copy.deepcopy(base), every=2)
    slow = replace_wrap.convert(copy.deepcopy(base), every=2, fast_path=False)
    x = torch.randn(4, 32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yf, ys = fast(x), slow(x)
    assert torch.equal(yf, ys)
    yf.float().square().sum().backward()
    ys.float().square().sum().backward()
    assert taps == [1]
    got, want = fast[1].replacement.a.grad, slow[1].replacement.a.grad
    assert torch.isfinite(got).all() and got.abs() > 0
    assert (got - want).abs() < 0.5 * want.abs()  # a sampled estimate of the same gradient (16 of 128 rows)


def test_a_second_derivative_is_refused_with_the_way_to_get_one():
    net = replace_wrap.convert(_net(), every=2)
    x = torch.randn(4, 32, 8, requires_grad=True)
    with pytest.raises(replace_wrap.CompatibilityError, match="fast_path=False"):  # up front, as it is built
        torch.autograd.grad(net(x).square().sum(), x, create_graph=True)


def test_hf_llama_norms_take_the_row_kernel_and_merge_exactly(monkeypatch):
    taps = _taps(monkeypatch)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64)
    torch.manual_seed(0)
    model = replace_wrap.convert(transformers.LlamaForCausalLM(cfg), every=2)
    routes = {(r.layer, r.route) for b in replace_wrap.report(model).replaced for r in b.layers}
    assert ("LlamaRMSNorm", "kernel 'rms_norm'") in routes
    ids = torch.randint(0, 64, (2, 24))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    a = model.model.layers[1].replacement.a
    assert a.grad is not None and a.grad.abs() > 0
    assert len(taps) == 2 * len(replace_wrap.report(model).replaced) * 2  # 2 norms a replaced block, 2 steps
    with torch.no_grad():
        want = model(ids).logits
    plain = replace_wrap.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want)
