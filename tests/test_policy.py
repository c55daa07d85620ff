"""Policies: which blocks they select, and the errors for selections that cannot be replaced."""

from __future__ import annotations

import pytest
import torch

import replace_wrap
from replace_wrap import AllOf, AnyOf, Every, Filter, Indices, Pattern, Policy, PolicyError
from replace_wrap.analysis.discovery import Stack
from toys import ResidualMLP


def stack(n: int, name: str = "blocks.*") -> Stack:
    mods = tuple(torch.nn.Linear(2, 2) for _ in range(n))
    return Stack(name, tuple(f"blocks.{i}" for i in range(n)), mods)


def replaced_paths(model, **kw):
    return [b.path for b in replace_wrap.plan(model, **kw).replaced]


@pytest.mark.parametrize(
    "k,offset,n,expected",
    [(2, 0, 12, [1, 3, 5, 7, 9]), (2, 0, 3, [1]), (2, 0, 2, []), (3, 0, 10, [2, 5, 8]), (2, 1, 8, [2, 4, 6]),
     (3, 1, 10, [3, 6]), (4, 0, 4, []), (2, 0, 1, [])],
)
def test_every_indices(k, offset, n, expected):
    assert Every(k, offset=offset).indices(n) == expected


@pytest.mark.parametrize("bad", [0, 1, -2, 2.0, "2", True, None])
def test_every_rejects_invalid_k(bad):
    with pytest.raises(PolicyError, match=r"every must be an integer >= 2, got"):
        Every(bad)


@pytest.mark.parametrize("bad", [0, 1, -1, 2.5, "3"])
def test_convert_every_is_validated_not_coerced(bad):
    model = ResidualMLP()
    with pytest.raises(PolicyError, match=repr(bad).replace("(", r"\(").replace(".", r"\.")):
        replace_wrap.convert(model, every=bad)
    assert not any(isinstance(m, replace_wrap.ReplacementSite) for m in model.modules())


def test_every_offset_validation():
    with pytest.raises(PolicyError, match="offset must be an integer >= 0, got -1"):
        Every(2, offset=-1)


def test_indices_negative_and_stack_filter():
    assert Indices([1, -2]).select(stack(6)) == [1, 4]
    assert Indices([1], stack=r"other\..*").select(stack(6)) == []
    assert Indices([1], stack=r"blocks\.\*").select(stack(6)) == [1]


def test_indices_out_of_range_names_stack_and_length():
    with pytest.raises(PolicyError, match=r"index 7 does not exist in stack 'blocks.\*', which has 6 blocks"):
        replace_wrap.plan(ResidualMLP(depth=6), policy=Indices([7]))


def test_indices_rejects_non_integers():
    with pytest.raises(PolicyError, match=r"Indices takes integers, got \['1'\]"):
        Indices(["1"])


@pytest.mark.parametrize(
    "indices,message",
    [
        ([0], r"'blocks.0' \(first\)"),
        ([5], r"'blocks.5' \(last\)"),
        ([2, 3], r"adjacent blocks 'blocks.2' and 'blocks.3'"),
    ],
)
def test_invalid_selections_name_the_blocks(indices, message):
    model = ResidualMLP(depth=6)
    with pytest.raises(PolicyError, match=message):
        replace_wrap.convert(model, policy=Indices(indices))
    assert not any(isinstance(m, replace_wrap.ReplacementSite) for m in model.modules())


def test_pattern_include_exclude():
    model = ResidualMLP(depth=8)
    assert replaced_paths(model, policy=Pattern(include=r"blocks\.(2|5)")) == ["blocks.2", "blocks.5"]
    assert replaced_paths(model, policy=Every(2) & Pattern(exclude=r"blocks\.3")) == ["blocks.1", "blocks.5"]
    assert replaced_paths(model, policy=Pattern(include=[r"blocks\.1", r"blocks\.6"])) == ["blocks.1", "blocks.6"]


def test_pattern_errors():
    with pytest.raises(PolicyError, match="Pattern needs include=, exclude= or both"):
        Pattern()
    with pytest.raises(PolicyError, match=r"include pattern '\(' is not a valid regular expression"):
        Pattern(include="(")


def test_plain_callable_is_a_policy():
    model = ResidualMLP(depth=6)
    picked = replaced_paths(model, policy=lambda module, path: path in {"blocks.1", "blocks.4"})
    assert picked == ["blocks.1", "blocks.4"]
    seen = []
    replace_wrap.plan(model, policy=lambda m, p: seen.append((type(m).__name__, p)) or False)
    assert seen == [("ResidualMLPBlock", f"blocks.{i}") for i in range(6)]


def test_combinators():
    model = ResidualMLP(depth=9)
    union = Indices([1]) | Indices([4]) | (lambda m, p: p == "blocks.7")
    assert replaced_paths(model, policy=union) == ["blocks.1", "blocks.4", "blocks.7"]
    assert isinstance(union, AnyOf)
    both = AllOf(Every(2), Pattern(include=r"blocks\.[1-4]"))
    assert replaced_paths(model, policy=both) == ["blocks.1", "blocks.3"]
    with pytest.raises(PolicyError, match="adjacent"):  # a union is validated like any explicit selection
        replace_wrap.plan(model, policy=Every(2) | Every(2, offset=1))


def test_duck_typed_policy_and_custom_subclass():
    class Middle(Policy):
        def select(self, stack):
            return [len(stack) // 2]

    class Duck:
        def select(self, stack):
            return [1]

    model = ResidualMLP(depth=7)
    assert replaced_paths(model, policy=Middle()) == ["blocks.3"]
    assert replaced_paths(model, policy=Duck()) == ["blocks.1"]


def test_policy_returning_non_integers_is_an_error():
    class Bad(Policy):
        def select(self, stack):
            return ["1"]

    with pytest.raises(PolicyError, match=r"a policy must return integer indices; got '1'"):
        replace_wrap.plan(ResidualMLP(), policy=Bad())


def test_not_a_policy():
    with pytest.raises(PolicyError, match="policy must be a replace_wrap.Policy"):
        replace_wrap.plan(ResidualMLP(), policy=3)


def test_every_and_policy_together_is_an_error():
    with pytest.raises(PolicyError, match="pass either every= or policy=, not both"):
        replace_wrap.plan(ResidualMLP(), every=2, policy=Every(2))


def test_filter_requires_callable():
    with pytest.raises(PolicyError, match=r"Filter needs a callable"):
        Filter(5)


def test_policy_applies_per_stack():
    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(5))
            self.decoder = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(4))
            self.bridge = torch.nn.Linear(4, 6)

        def forward(self, x):
            for m in self.encoder:
                x = m(x)
            x = self.bridge(x)
            for m in self.decoder:
                x = m(x)
            return x

    rep = replace_wrap.plan(TwoStacks(), every=2)
    assert rep.stacks == [("encoder.*", 5), ("decoder.*", 4)]
    assert [b.path for b in rep.replaced] == ["encoder.1", "encoder.3", "decoder.1"]
    only_decoder = replace_wrap.plan(TwoStacks(), policy=Indices([2], stack=r"decoder.*"))
    assert [b.path for b in only_decoder.replaced] == ["decoder.2"]
