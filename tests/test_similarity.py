"""Similarity and the engine's initial-scalars hook: selection by fit, initialisation from the fit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import replace_wrap
from replace_wrap import Every, Pattern, PolicyError, Similarity
from replace_wrap.selection.policies import Policy
from toys import ResidualMLP

pytestmark = pytest.mark.usefixtures("one_thread")


def _make_mix(model: nn.Module, i: int, a: float | list[float], b: float | list[float]) -> None:
    """Overwrite block i's tensors with a * block(i-1) + b * block(i+1) (per tensor if lists)."""
    blocks = model.blocks
    own = list(blocks[i].parameters())
    prev, nxt = list(blocks[i - 1].parameters()), list(blocks[i + 1].parameters())
    with torch.no_grad():
        for k, (o, p, n) in enumerate(zip(own, prev, nxt)):
            ak = a[k] if isinstance(a, list) else a
            bk = b[k] if isinstance(b, list) else b
            o.copy_(ak * p + bk * n)


def _outputs_close(model, original, x, atol):
    model.eval(), original.eval()
    with torch.no_grad():
        return (model(x) - original(x)).abs().max().item() <= atol


def test_selects_exact_mixes_and_starts_from_them():
    model = ResidualMLP(depth=8)
    _make_mix(model, 2, 0.3, 0.6)
    _make_mix(model, 5, -0.4, 1.2)
    original = copy.deepcopy(model)
    rep = replace_wrap.plan(model, policy=Similarity(count=2))
    assert [b.path for b in rep.replaced] == ["blocks.2", "blocks.5"]
    assert rep.replaced[0].scalars["a"] == [pytest.approx(0.3, abs=1e-5)]
    assert rep.replaced[1].scalars["b"] == [pytest.approx(1.2, abs=1e-5)]
    replace_wrap.convert(model, policy=Similarity(count=2))
    site = model.blocks[5].replacement
    assert site.a.item() == pytest.approx(-0.4, abs=1e-5) and site.b.item() == pytest.approx(1.2, abs=1e-5)
    assert _outputs_close(model, original, ResidualMLP.example(16), atol=1e-5)  # the converted model = the original
    assert replace_wrap.report(model).replaced[1].scalars == rep.replaced[1].scalars


def test_per_tensor_fit_with_tensor_scalars():
    model = ResidualMLP(depth=6)
    with torch.no_grad():  # fresh LayerNorms are equal in every block: no fit could tell a from b there
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    coeffs_a = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    coeffs_b = [0.9, -0.5, 0.7, 0.0, 0.2, 1.0]
    _make_mix(model, 2, coeffs_a, coeffs_b)
    original = copy.deepcopy(model)
    x = ResidualMLP.example(16)
    joint = copy.deepcopy(model)
    replace_wrap.convert(joint, policy=Similarity(count=1))  # one pair cannot express six different mixes
    assert not _outputs_close(joint, original, x, atol=1e-4)
    replace_wrap.convert(model, policy=Similarity(count=1), scalars="tensor")
    site = model.blocks[2].replacement
    assert site.a.tolist() == pytest.approx(coeffs_a, abs=1e-5) and site.b.tolist() == pytest.approx(coeffs_b, abs=1e-5)
    assert _outputs_close(model, original, x, atol=1e-5)


@pytest.mark.parametrize("rule", ["convex", "ema"])
def test_fit_goes_through_the_rule(rule):
    model = ResidualMLP(depth=6)
    _make_mix(model, 3, 0.25, 0.75)  # an affine mix: every built-in rule can express it
    original = copy.deepcopy(model)
    replace_wrap.convert(model, policy=Similarity(count=1), rule=rule)
    assert [b.path for b in replace_wrap.report(model).replaced] == ["blocks.3"]
    a, b = model.blocks[3].replacement.coefficients()
    assert a.item() == pytest.approx(0.25, abs=1e-4) and b.item() == pytest.approx(0.75, abs=1e-4)
    if rule == "convex":
        assert model.blocks[3].replacement.alpha.item() == pytest.approx(torch.logit(torch.tensor(0.25)).item(), abs=1e-3)
    assert _outputs_close(model, original, ResidualMLP.example(16), atol=1e-5)


def test_convex_fit_is_constrained_and_clamped():
    model = ResidualMLP(depth=5)
    _make_mix(model, 2, 0.7, 0.7)  # not affine: the convex rule fits a + b = 1 instead
    rep = replace_wrap.plan(model, policy=Similarity(count=1), rule="convex")
    (a,), (b,) = rep.replaced[0].scalars["a"], rep.replaced[0].scalars["b"]
    assert a + b == pytest.approx(1.0) and 0.0 < a < 1.0


def test_every_threshold_and_trainable():
    model = ResidualMLP(depth=10)  # candidates 1..8; Every(2) takes 4 of them
    _make_mix(model, 4, 0.5, 0.5)
    _make_mix(model, 6, 0.8, 0.1)
    # every=2: as many as Every(2) per stack, the best-fitting ones
    every = replace_wrap.plan(model, policy=Similarity(every=2))
    assert len(every.replaced) == len(replace_wrap.plan(model, every=2).replaced) == 4
    assert {"blocks.4", "blocks.6"} <= {b.path for b in every.replaced}
    assert Similarity().every == 2  # the default
    # threshold alone: only the near-exact mixes
    strict = replace_wrap.plan(model, policy=Similarity(threshold=1e-4))
    assert [b.path for b in strict.replaced] == ["blocks.4", "blocks.6"]
    capped = replace_wrap.plan(model, policy=Similarity(count=1, threshold=1e-4))
    assert len(capped.replaced) == 1
    # trainable: a parameter budget met by the most redundant blocks, scalars from their fit
    budget = replace_wrap.plan(model, policy=Similarity(trainable=0.85))
    assert budget.trainable_ratio <= 0.85
    with pytest.raises(replace_wrap.BudgetError, match=r"^Similarity\(trainable=0\.2\): a trainable fraction of 0\.2 is"):
        replace_wrap.plan(model, policy=Similarity(trainable=0.2))
    assert [b.path for b in budget.replaced] == ["blocks.4", "blocks.6"]
    assert budget.replaced[1].scalars["a"] == [pytest.approx(0.8, abs=1e-5)]
    scores = Similarity().scores(model)
    assert scores["blocks.4"] == pytest.approx(0.0, abs=1e-6) and scores["blocks.3"] > 0.5
    assert min(scores, key=scores.get) in ("blocks.4", "blocks.6")


def test_never_adjacent_even_when_neighbours_fit_best():
    model = ResidualMLP(depth=8)
    _make_mix(model, 3, 0.5, 0.5)
    _make_mix(model, 4, 0.5, 0.5)  # blocks 3 and 4 both fit exactly, but cannot both be replaced
    rep = replace_wrap.plan(model, policy=Similarity(count=2))
    idx = [b.index for b in rep.replaced]
    assert len(idx) == 2 and all(j - i > 1 for i, j in zip(idx, idx[1:]))
    assert set(idx) & {3, 4}



@pytest.mark.parametrize("seed", [0, 1, 2])
def test_starts_closer_than_every_on_a_trained_model(one_thread, seed):
    """The issue's claim: on trained weights, Similarity's converted model starts closer to the original."""
    torch.manual_seed(seed)
    model = ResidualMLP(depth=8, width=16, n_in=8, n_out=4)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(512, 8)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    losses = {}
    for name, policy in (("every", Every(2)), ("similarity", Similarity(every=2))):
        converted = replace_wrap.convert(copy.deepcopy(model), policy=policy)
        converted.eval()
        with torch.no_grad():
            losses[name] = nn.functional.cross_entropy(converted(x), y).item()
    with torch.no_grad():
        trained = nn.functional.cross_entropy(model(x), y).item()
    assert trained < losses["similarity"] < losses["every"]


# --- the engine hook --------------------------------------------------------------------------------


class _Fixed(Policy):
    """Replaces block 2 and returns whatever it is given as initial scalars."""

    def __init__(self, value):
        self.value = value

    def select(self, stack):
        return [2]

    def initial_scalars(self, stack, index, match, n_sets):
        return self.value

    def __repr__(self):
        return "_Fixed()"


def test_hook_values_reach_every_rule():
    for rule in replace_wrap.list_rules():
        if rule.startswith("test_"):
            continue
        model = ResidualMLP(depth=5)
        replace_wrap.convert(model, policy=_Fixed((0.2, 0.8)), rule=rule)
        a, b = model.blocks[2].replacement.coefficients()
        assert (a.item(), b.item()) == (pytest.approx(0.2, abs=1e-5), pytest.approx(0.8, abs=1e-5)), rule
    model = ResidualMLP(depth=5)
    replace_wrap.convert(model, policy=_Fixed(([0.1] * 6, torch.arange(6.0))), scalars="tensor")
    assert model.blocks[2].replacement.b.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("value", "options", "message"),
    [
        (0.5, {}, r"_Fixed\(\)\.initial_scalars for block 'blocks\.2' must return None or a pair \(a, b\), got 0\.5"),
        (("x", 1.0), {}, r"returned a='x', not numbers"),
        (([0.1, 0.2], 0.5), {}, r"returned a with 2 values; the block has 1 scalar set\(s\) \(scalars=block\)"),
        (([0.1, 0.2], 0.5), {"scalars": "tensor"}, r"returned a with 2 values; the block has 6 scalar set\(s\)"),
        ((0.5, float("nan")), {}, r"returned a non-finite b: \[nan\]"),
    ],
)
def test_hook_errors(value, options, message):
    model = ResidualMLP(depth=5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PolicyError, match=message):
        replace_wrap.convert(model, policy=_Fixed(value), **options)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not hasattr(model.blocks[2], "replacement")


def test_hook_through_combinators_and_duck_typed_policies():
    model = ResidualMLP(depth=7)
    _make_mix(model, 3, 0.3, 0.6)
    both = Similarity(count=1) & Pattern(include=r"blocks\.[1-5]")
    rep = replace_wrap.plan(model, policy=both)
    assert rep.replaced[0].scalars["a"] == [pytest.approx(0.3, abs=1e-5)]
    either = Pattern(include=r"blocks\.1") | Similarity(count=1)  # Pattern has no opinion: Similarity's fit
    rep = replace_wrap.plan(model, policy=either)
    assert {b.path: b.scalars["a"][0] for b in rep.replaced}["blocks.3"] == pytest.approx(0.3, abs=1e-5)

    class Duck:
        def select(self, stack):
            return [3]

        def initial_scalars(self, stack, index, match, n_sets):
            return 0.1, 0.9

    rep = replace_wrap.plan(model, policy=Duck())
    assert rep.replaced[0].scalars == {"a": [pytest.approx(0.1)], "b": [pytest.approx(0.9)]}


def test_rule_that_cannot_start_from_the_scalars(monkeypatch):
    model = ResidualMLP(depth=5)
    with pytest.raises(replace_wrap.ConfigError, match=r"rule 'linear' cannot start block 'blocks\.2' from the policy's"):
        monkeypatch.setattr(
            replace_wrap.synthesis.rules.LinearRule, "params_from_coefficients",
            lambda self, a, b: (_ for _ in ()).throw(replace_wrap.ConfigError("no")),
        )
        replace_wrap.plan(model, policy=_Fixed((0.2, 0.8)))


def test_fit_reads_neighbour_tensors_through_their_adapters():
    """At CNN stage boundaries the synthesis mixes sliced / zero-padded neighbours: so does the fit."""
    from replace_wrap.surgery.fits import block_fits, relative_residual
    from replace_wrap.synthesis.adapt import ShapeAdapter
    from replace_wrap.surgery.matching import BlockMatch, TensorMatch

    own, prev, nxt = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    wide_prev, wide_next, small = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 4)
    with torch.no_grad():
        own.weight.copy_(0.3 * prev.weight + 0.6 * nxt.weight)
        small.bias.copy_(0.3 * wide_prev.bias[:4] + 0.6 * wide_next.bias[:4])  # the first 4 of 8 entries
    slice8to4 = ShapeAdapter((8,), (4,))
    match = BlockMatch(synthesized=[
        TensorMatch("", "weight", (4, 4), own, prev, nxt),
        TensorMatch("", "bias", (4,), small, wide_prev, wide_next, slice8to4, slice8to4),
    ])
    (joint,) = block_fits(match, 1, affine=False)
    assert (joint.a, joint.b) == (pytest.approx(0.3, abs=1e-6), pytest.approx(0.6, abs=1e-6))
    assert joint.relative == pytest.approx(0.0, abs=1e-6)
    # an absent side counts as zeros: the bias is then explained by the previous block alone
    with torch.no_grad():
        small.bias.copy_(0.7 * wide_prev.bias[:4])
    match.synthesized[1] = TensorMatch("", "bias", (4,), small, wide_prev, None, slice8to4, ShapeAdapter(None, (4,)))
    per_tensor = block_fits(match, 2, affine=False)
    assert per_tensor[0].relative == pytest.approx(0.0, abs=1e-6)
    assert per_tensor[1].a == pytest.approx(0.7, abs=1e-6) and per_tensor[1].relative == pytest.approx(0.0, abs=1e-6)
    assert relative_residual(per_tensor) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 2, "count": 1}, r"one of every=, count= or trainable=, got every and count"),
        ({"every": 1}, r"every must be an integer >= 2, got 1"),
        ({"count": 0}, r"Similarity\(count=\.\.\.\) must be an integer >= 1 \(blocks per stack\), got 0"),
        ({"threshold": -0.1}, r"a number >= 0 \(0: exact mixes only, 1: any block\); got -0\.1"),
        ({"trainable": 2.0}, r"a number in \(0, 1\]; got 2\.0"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        Similarity(**kwargs)
    assert repr(Similarity(count=2, threshold=0.5)) == "Similarity(count=2, threshold=0.5)"
