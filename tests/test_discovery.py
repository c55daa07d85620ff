"""Block discovery on the structures the model zoo throws at it (graph.find_stacks / analyse)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import replace_wrap
from conftest import TOL, oracle_model
from replace_wrap.analysis.discovery import analyse, find_stacks
from toys import StageBlock


class Mlp(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.fc1 = nn.Linear(c_in, 2 * c_in)
        self.fc2 = nn.Linear(2 * c_in, c_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class WideningMLP(nn.Module):
    """Blocks that all differ in width: no two blocks have the same shapes, only the same structure."""

    def __init__(self, widths=(4, 6, 8, 10, 12)):
        super().__init__()
        self.blocks = nn.Sequential(*(Mlp(a, b) for a, b in zip(widths, widths[1:] + (widths[-1],))))

    def forward(self, x):
        return self.blocks(x)


class OneBlockStages(nn.Module):
    """CNN stages of one (strided, projecting) block each, like resnet10t or darknet17."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        widths = (4, 6, 8, 10, 12)
        self.stages = nn.Sequential(
            *(nn.Sequential(StageBlock(a, b, stride=2 if i else 1)) for i, (a, b) in enumerate(zip(widths, widths[1:])))
        )

    def forward(self, x):
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class TwoBranch(nn.Module):
    """Two parallel blocks on the same input, summed (RepVGG-like branches that are blocks themselves)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.branch1 = Mlp(c_in, c_out)
        self.branch2 = Mlp(c_in, c_out)

    def forward(self, x):
        return self.branch1(x) + self.branch2(x)


class BranchyNet(nn.Module):
    def __init__(self, widths=(4, 6, 8, 10)):
        super().__init__()
        self.units = nn.Sequential(*(TwoBranch(a, b) for a, b in zip(widths, widths[1:] + (widths[-1],))))

    def forward(self, x):
        return self.units(x)


class DenseBlock(nn.ModuleDict):
    """A ModuleDict with a forward of its own (DenseNet's DenseBlock): it can be a block."""

    def __init__(self, width: int, n: int = 2):
        super().__init__({f"layer{i}": Mlp(width, width) for i in range(n)})
        self.gain = nn.Parameter(torch.ones(width))  # so the block is more than the layers it holds

    def forward(self, x):
        for layer in self.values():
            x = x + layer(x)
        return x * self.gain


def _paths(stacks):
    return [list(s.paths) for s in stacks]


def test_blocks_that_differ_only_in_shape_form_a_stack_and_convert():
    model = WideningMLP()
    (stack,) = find_stacks(model)
    assert list(stack.paths) == [f"blocks.{i}" for i in range(5)]  # the blocks, not fc1/fc2 inside them
    original = copy.deepcopy(model)
    replace_wrap.convert(model, every=2)
    assert [b.path for b in replace_wrap.report(model).replaced] == ["blocks.1", "blocks.3"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle_model(original, model)(x), atol=TOL["oracle"], rtol=1e-5)


def test_single_block_stages_chain_across_stages():
    model = OneBlockStages()
    (stack,) = find_stacks(model)
    # the blocks inside the one-block Sequential stages, not the wrappers
    assert list(stack.paths) == [f"stages.{i}.0" for i in range(4)]
    rep = replace_wrap.plan(model, every=2)
    assert [b.path for b in rep.replaced] == ["stages.1.0"]
    assert rep.replaced[0].adapted and not rep.skipped


def test_linear_layers_in_a_sequential_are_still_a_stack():
    net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])
    assert _paths(find_stacks(net)) == [["0", "1", "2", "3", "4"]]


def test_parallel_branches_are_refuted_by_the_graph():
    model = BranchyNet()
    # structurally the branches look like the better stack (exact repeats); the graph shows they run side by
    # side, so the units are taken instead
    assert _paths(find_stacks(model))[0][:2] == ["units.0.branch1", "units.0.branch2"]
    analysis = analyse(model)
    assert analysis.route == "fx"
    assert _paths(analysis.stacks) == [["units.0", "units.1", "units.2", "units.3"]]
    assert any("set aside" in n for n in analysis.notes)
    model.eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        y = model(x)
    replace_wrap.convert(model, every=2)
    replace_wrap.merge(model)
    with torch.no_grad():
        assert model(x).shape == y.shape


def test_module_dict_with_forward_can_be_a_block():
    model = nn.Sequential(*[DenseBlock(4) for _ in range(4)])
    stacks = analyse(model).stacks
    assert ["0", "1", "2", "3"] in _paths(stacks)


def test_sequential_blocks_keep_working_with_the_site_inside():
    """A replaced block that is an nn.Sequential calls every child, the ReplacementSite too (identity)."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)) for _ in range(5)])
    original = copy.deepcopy(model)
    replace_wrap.convert(model, every=2)
    assert isinstance(model[1].replacement, replace_wrap.ReplacementSite)
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle_model(original, model)(x), atol=TOL["oracle"], rtol=1e-5)
    replace_wrap.merge(model)
    assert list(model.state_dict()) == list(original.state_dict())


def test_period_two_alternation_is_one_stack():
    class Block(nn.Module):
        def __init__(self, se: bool):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.se = nn.Linear(8, 8) if se else None

        def forward(self, x):
            y = self.fc2(torch.relu(self.fc1(x)))
            return x + (y * torch.sigmoid(self.se(y)) if self.se is not None else y)

    model = nn.Sequential(*[Block(se=i % 2 == 1) for i in range(6)])
    (stack,) = analyse(model).stacks
    assert len(stack) == 6
    rep = replace_wrap.plan(model, every=2)
    b = rep.replaced[0]
    assert b.path == "1" and {k for k, _ in b.kept_tensors} == {"se.weight", "se.bias"}


def test_parameter_free_items_do_not_break_a_run():
    """VGG: convolutions separated by activations and pooling in one Sequential are one stack."""
    widths = (3, 8, 8, 16, 16)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if b != a else [])
    model = nn.Sequential(*layers)
    (stack,) = analyse(model).stacks
    assert list(stack.paths) == [str(i) for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]
    replace_wrap.convert(model, every=2)
    assert len(replace_wrap.report(model).replaced) == 1
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 16, 2, 2)
