"""Block discovery and the analysis routes (fx, export, structural)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import replace_wrap
from replace_wrap.analysis.discovery import analyse, find_stacks, template
from conftest import assert_same_state, state_snapshot
from toys import ResidualMLP, SharedSubmoduleNet, TinyTransformer


def test_template():
    assert template("stages.1.blocks.0") == "stages.*.blocks.*"
    assert template("layer3.2") == "layer*.*"
    assert template("") == ""


def test_fx_route_for_traceable_model():
    a = analyse(ResidualMLP())
    assert a.route == "fx" and [(s.name, len(s)) for s in a.stacks] == [("blocks.*", 6)]


def test_trace_false_uses_structural_route():
    assert analyse(ResidualMLP(), trace=False).route == "structural"


class Untraceable(nn.Module):
    """Shape-dependent control flow: torch.fx cannot trace it, torch.export (static shapes) can."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    def forward(self, x):
        if x.shape[0] > 1000:  # FX cannot branch on a Proxy; export specializes on the example's shape
            return x
        for b in self.blocks:
            x = b(x)
        return x


def test_structural_fallback_and_export_route():
    model = Untraceable()
    a = analyse(model)
    assert a.route == "structural"
    assert a.notes[0].startswith("torch.fx could not trace Untraceable:")
    a = analyse(model, example_inputs=torch.randn(2, 4))
    assert a.route == "export" and [(s.name, len(s)) for s in a.stacks] == [("blocks.*", 5)]
    rep = replace_wrap.plan(model, example_inputs=(torch.randn(2, 4),))
    assert rep.route == "export" and [b.path for b in rep.replaced] == ["blocks.1", "blocks.3"]


class Reversed(nn.Module):
    """Blocks registered in one order, run in the opposite order."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    def forward(self, x):
        for b in reversed(self.blocks):
            x = b(x)
        return x


def test_graph_orders_by_execution():
    a = analyse(Reversed())
    assert a.stacks[0].paths == tuple(f"blocks.{i}" for i in (4, 3, 2, 1, 0))
    assert analyse(Reversed(), trace=False).stacks[0].paths == tuple(f"blocks.{i}" for i in range(5))


class ParallelHeads(nn.Module):
    """Same-shape modules applied side by side: not a stack, since none feeds the next."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        return sum(h(x) for h in self.heads)


def test_parallel_branches_are_split():
    a = analyse(ParallelHeads())
    assert [len(s) for s in a.stacks] == [1, 1, 1, 1]
    assert any("split between heads.0 and heads.1: the first does not feed the second" in n for n in a.notes)
    with pytest.raises(replace_wrap.NothingToReplaceError):
        replace_wrap.convert(ParallelHeads())
    # the structural route cannot see that, and says which route it used
    assert replace_wrap.plan(ParallelHeads(), trace=False).route == "structural"


class DeadBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))

    def forward(self, x):
        for b in self.blocks[:5]:
            x = b(x)
        return x


def test_blocks_that_never_run_are_left_out():
    a = analyse(DeadBlock())
    assert a.stacks[0].paths == tuple(f"blocks.{i}" for i in range(5))
    assert "blocks.5 never run in the traced forward; left out" in a.notes[0]


def test_plain_attribute_blocks():
    a = analyse(TinyTransformer(depth=5))
    assert [(s.name, len(s)) for s in a.stacks] == [("layer*", 5)]


def test_shared_submodule_is_not_rewritten():
    model = SharedSubmoduleNet(depth=5)
    shared = model.shared
    replace_wrap.convert(model)
    rep = replace_wrap.report(model)
    for b in rep.replaced:
        assert b.synthesized == ("fc.weight", "fc.bias")
        assert b.kept_tensors == (("pos.weight", "shared with shared"), ("pos.bias", "shared with shared"))
    assert type(shared) is nn.Linear and isinstance(shared._parameters["weight"], nn.Parameter)
    assert all(blk.pos is shared for blk in model.blocks)


class TiedBlock(nn.Module):
    """A block whose two layers share one weight (``fc2.weight is fc1.weight``)."""

    def __init__(self, d=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


def _tied_net():
    torch.manual_seed(0)
    return nn.Sequential(*[TiedBlock() for _ in range(5)])


def test_tensor_tied_inside_a_block_stays_its_own_and_tied():
    """Per-tensor scalars would synthesize fc1.weight and fc2.weight apart: the tie would break, and the
    converted model's checkpoint, loaded into the plain (tied) model, would predict something else."""
    model, x = _tied_net(), torch.randn(3, 4)
    replace_wrap.convert(model, scalars="tensor")
    rep = replace_wrap.report(model)
    for b in rep.replaced:
        assert b.synthesized == ("fc1.bias", "fc2.bias")
        assert b.kept_tensors == (("fc1.weight", "tied to fc2.weight inside the block"),
                                  ("fc2.weight", "tied to fc1.weight inside the block"))
    assert rep.trainable_before == sum(p.numel() for p in _tied_net().parameters())  # the tied tensor once
    with torch.no_grad():
        for p in model[1].replacement.parameters():
            p.copy_(torch.tensor([0.3, 0.9]).reshape(p.shape))  # the two biases' scalars apart
        y = model(x)
        plain = _tied_net()
        plain.load_state_dict(model.state_dict(), strict=False)  # the plain checkpoint (plus the scalars)
        torch.testing.assert_close(plain(x), y, rtol=0, atol=0)
        merged = replace_wrap.merge(model)
        torch.testing.assert_close(merged(x), y, rtol=0, atol=0)
    assert merged[1].fc1.weight is merged[1].fc2.weight


class Alternating(nn.Module):
    """Period-2 alternation: blocks with and without an extra gate alternate (repvit's SE / no-SE)."""

    def __init__(self, depth=7):
        super().__init__()
        self.blocks = nn.ModuleList(AltBlock(4, gate=i % 2 == 0) for i in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class AltBlock(nn.Module):
    def __init__(self, width, gate):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gate = nn.Linear(width, width) if gate else nn.Identity()

    def forward(self, x):
        return x + self.fc(x) * torch.sigmoid(self.gate(x))


def test_period_two_alternation():
    rep = replace_wrap.plan(Alternating(), every=2)
    assert rep.stacks == [("blocks.*", 7)]
    # the gate-less blocks 1, 3, 5 take their tensors from gated neighbours, which have them too
    assert [b.path for b in rep.replaced] == ["blocks.1", "blocks.3", "blocks.5"]
    rep = replace_wrap.plan(Alternating(), policy=replace_wrap.Indices([2]), adapt_shapes=False)
    assert rep.skipped[0].reason == "tensor 'gate.weight' of shape (4, 4) has no counterpart in the previous block 'blocks.1'"
    # with shape adaptation (the default) the gated block 2 is replaced; its gate, which neither gate-less
    # neighbour has, stays its own parameter
    (b,) = replace_wrap.plan(Alternating(), policy=replace_wrap.Indices([2])).replaced
    assert b.synthesized == ("fc.weight", "fc.bias")
    assert [k for k, _ in b.kept_tensors] == ["gate.weight", "gate.bias"]


class Nested(nn.Module):
    """Blocks whose LayerNorms would also form a chained stack: the blocks must win."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(NestedBlock() for _ in range(4))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


class NestedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_a = nn.LayerNorm(4)
        self.ln_b = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.ln_b(self.fc(self.ln_a(x)))


def test_outer_blocks_beat_their_inner_layers():
    stacks = find_stacks(Nested())
    assert [(s.name, len(s)) for s in stacks] == [("layers.*", 4)]


def test_analysis_keeps_modes_and_checkpointing_flags():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    model.train()
    model.blocks[3].eval()  # a mixed state must survive too
    before = state_snapshot(model)
    rep = replace_wrap.plan(model, example_inputs=torch.randn(1, 3, 32, 32))
    assert_same_state(before, state_snapshot(model))
    assert model.grad_checkpointing is True
    assert len(rep.replaced) == 5


def test_export_route_keeps_model_state():
    model = Untraceable().train()
    model.register_buffer("counter", torch.zeros(1))
    before = state_snapshot(model)
    replace_wrap.plan(model, example_inputs=torch.randn(2, 4))
    assert_same_state(before, state_snapshot(model))


def test_timm_stacks_are_the_blocks():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert [(s.name, len(s)) for s in find_stacks(vit)] == [("blocks.*", 12)]
    resnet = timm.create_model("resnet18", pretrained=False)
    assert [(s.name, len(s)) for s in find_stacks(resnet)] == [("layer*.*", 8)]


class SideEffects(nn.Module):
    """A forward that counts calls, caches its input and registers a buffer on first use."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.cache = x
        if "seen" not in self._buffers:
            self.register_buffer("seen", torch.ones(1))
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("example", [None, torch.randn(2, 4)])
def test_forward_side_effects_during_analysis_are_undone(example):
    model = SideEffects()
    before = state_snapshot(model)
    rep = replace_wrap.plan(model, example_inputs=example)
    assert rep.route == "fx"  # fx traces it; the side effects happened on proxies and are rolled back
    assert_same_state(before, state_snapshot(model))
    assert model.calls == 0 and not hasattr(model, "cache")
