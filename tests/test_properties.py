"""Property tests (hypothesis) for the selection rules, parameter accounting, merge and atomicity."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replace_wrap
from replace_wrap import Every, Indices, PolicyError
from replace_wrap.surgery import swap as hooks
from replace_wrap.synthesis.maths import mix
from conftest import TOL, assert_same_state, mix_error_bound, state_snapshot
from toys import ResidualMLP

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

depths = st.integers(min_value=1, max_value=9)
widths = st.integers(min_value=2, max_value=6)
periods = st.integers(min_value=2, max_value=5)
offsets = st.integers(min_value=0, max_value=3)


@SETTINGS
@given(n=st.integers(min_value=0, max_value=40), k=periods, offset=offsets)
def test_every_never_selects_first_last_or_adjacent(n, k, offset):
    picked = Every(k, offset=offset).indices(n)
    assert all(1 <= i <= n - 2 for i in picked)
    assert all(j - i >= 2 for i, j in zip(picked, picked[1:]))
    assert picked == [i for i in range(1, n - 1) if i >= offset + k - 1 and (i - offset - k + 1) % k == 0]


@SETTINGS
@given(depth=depths, width=widths, k=periods, offset=offsets, scalars=st.sampled_from(["block", "tensor"]),
       rule=st.sampled_from(["linear", "convex"]))
def test_selection_and_parameter_accounting(depth, width, k, offset, scalars, rule):
    model = ResidualMLP(depth=depth, width=width)
    before = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    expected = Every(k, offset=offset).indices(depth)
    if not expected:
        with pytest.raises(replace_wrap.NothingToReplaceError):
            replace_wrap.convert(model, policy=Every(k, offset=offset), scalars=scalars, rule=rule)
        return
    replace_wrap.convert(model, policy=Every(k, offset=offset), scalars=scalars, rule=rule)
    rep = replace_wrap.report(model)
    assert [b.index for b in rep.replaced] == expected
    per_site = (6 if scalars == "tensor" else 1) * (2 if rule == "linear" else 1)
    after = sum(p.numel() for p in model.parameters())
    assert after == before - len(expected) * block_params + len(expected) * per_site
    assert rep.trainable_after == after


@SETTINGS
@given(depth=st.integers(min_value=3, max_value=8), width=widths, k=periods, seed=st.integers(0, 2**16),
       scalars=st.sampled_from(["block", "tensor"]), rule=st.sampled_from(["linear", "convex"]))
def test_merge_equals_converted(depth, width, k, seed, scalars, rule):
    torch.manual_seed(seed)
    model = ResidualMLP(depth=depth, width=width).eval()
    if not Every(k).indices(depth):
        return
    replace_wrap.convert(model, every=k, scalars=scalars, rule=rule)
    with torch.no_grad():
        for site in (m for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite)):
            for p in site.parameters():
                p.uniform_(-1.5, 1.5)
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = model(x)
        replace_wrap.merge(model)
        assert (model(x) - y).abs().max().item() <= TOL["merge"]
    assert list(model.state_dict()) == list(ResidualMLP(depth=depth, width=width).state_dict())


@SETTINGS
@given(depth=st.integers(min_value=3, max_value=9), k=periods, fail_at=st.integers(min_value=1, max_value=12))
def test_failed_convert_leaves_model_bit_identical(depth, k, fail_at):
    model = ResidualMLP(depth=depth)
    if not Every(k).indices(depth):
        return
    before = state_snapshot(model)
    real, calls = hooks.install, {"n": 0}

    def flaky(leaf, sources):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected")
        real(leaf, sources)

    hooks.install = flaky
    try:
        replace_wrap.convert(model, every=k)
        converted = True
    except RuntimeError:
        converted = False
    finally:
        hooks.install = real
    if converted:  # fewer installs than fail_at: the conversion completed; merge must then restore the keys
        replace_wrap.merge(model)
        assert before["keys"] == state_snapshot(model)["keys"]
    else:
        assert_same_state(before, state_snapshot(model))


@SETTINGS
@given(depth=st.integers(min_value=3, max_value=8), seed=st.integers(0, 2**16))
def test_keep_original_revert_round_trip(depth, seed):
    torch.manual_seed(seed)
    model = ResidualMLP(depth=depth)
    reference = copy.deepcopy(model.state_dict())
    replace_wrap.convert(model, keep_original=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training happened: neighbours and scalars moved
    replace_wrap.revert(model)
    for key, value in model.state_dict().items():
        if any(key.startswith(f"blocks.{i}.") for i in Every(2).indices(depth)):
            assert torch.equal(value, reference[key]), key  # replaced blocks: original tensors back


@SETTINGS
@given(n=st.integers(min_value=1, max_value=12), picks=st.lists(st.integers(-15, 15), max_size=5))
def test_indices_either_valid_or_policy_error(n, picks):
    model = ResidualMLP(depth=n)
    try:
        rep = replace_wrap.plan(model, policy=Indices(picks))
    except PolicyError as exc:
        assert "stack 'blocks.*'" in str(exc) or "Indices" in str(exc)
        return
    if n == 1:  # a single block is no stack: the policy is never consulted
        assert rep.stacks == [] and rep.replaced == []
        return
    chosen = sorted({p % n for p in picks})
    assert [b.index for b in rep.replaced] == chosen
    assert all(0 < i < n - 1 for i in chosen) and all(j - i > 1 for i, j in zip(chosen, chosen[1:]))


@SETTINGS
@given(
    a=st.floats(-4, 4), b=st.floats(-4, 4), shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_mix_is_the_linear_combination(a, b, shape, dtype):
    prev, nxt = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    out = mix(torch.tensor(a), torch.tensor(b), prev, nxt)
    assert out.dtype == dtype and out.shape == prev.shape
    ta, tb = torch.tensor(a), torch.tensor(b)  # fp32, as the scalars of a site are
    exact = ta.double() * prev.double() + tb.double() * nxt.double()
    assert bool(((out.double() - exact).abs() <= mix_error_bound(ta, tb, prev, nxt, dtype)).all())
    torch.testing.assert_close(mix(torch.tensor(1.0), torch.tensor(0.0), prev, nxt), prev)
