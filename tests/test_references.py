"""A replaced layer reaches its neighbours and scalars by reference: every way of copying, replicating or tracing a
converted model either keeps the trained function (with the scalars as its parameters) or refuses with a typed
error (issue 11, defect 3)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import types

import pytest
import torch
import torch.fx
from torch import nn

import replace_wrap
from replace_wrap.surgery.apply import sites
from replace_wrap import CompatibilityError
from toys import ResidualMLP, StagedCNN


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 2) -> nn.Module:
    """A few SGD steps so that scalars and neighbours are no longer at their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model


def test_a_deep_copy_of_the_model_is_the_same_function_and_trains_on_its_own():
    x = ResidualMLP.example()
    model = _trained(replace_wrap.convert(ResidualMLP(), every=2), x)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    # the copy synthesizes from its own neighbours and scalars: training it leaves the original alone
    before = model(x).detach()
    _trained(twin, x)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert not torch.equal(twin(x), before)
    assert replace_wrap.merge(twin) is twin  # and it merges as a model of its own


def test_a_deep_copy_of_a_stack_container_is_complete():
    model = replace_wrap.convert(ResidualMLP(), every=2)
    blocks = copy.deepcopy(model.blocks)  # holds the replaced blocks and all their neighbours
    h = torch.randn(3, 16)
    for original, copied in zip(model.blocks, blocks):
        torch.testing.assert_close(copied(h), original(h), rtol=0, atol=0)


def test_a_deep_copy_of_a_replaced_block_alone_is_refused_at_its_first_use():
    model = replace_wrap.convert(ResidualMLP(), every=2)
    lone = copy.deepcopy(model.blocks[1])
    with pytest.raises(CompatibilityError, match=r"deep-copied without its neighbour block\(s\) \['blocks.0', 'blocks.2'\]"):
        lone(torch.randn(2, 16))
    with pytest.raises(CompatibilityError, match="deep-copied"):  # and every later use
        lone(torch.randn(2, 16))
    model(ResidualMLP.example())  # the original is untouched


class _Kernel(nn.Module):  # a block of layer-kernel layers only: no synthesized tensor is read as an attribute
    def __init__(self, conv: bool):
        super().__init__()
        self.layer = nn.Conv2d(4, 4, 3, padding=1) if conv else nn.Linear(4, 4)

    def forward(self, x):
        return x + torch.tanh(self.layer(x))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_a_lone_copy_of_a_block_on_layer_kernels_is_refused_at_its_first_use(conv):
    # the copy check ran in the synthesized attribute only: a block whose layers all run on layer kernels
    # (which read the neighbours' tensors directly) computed silently with private copies of its neighbours
    model = replace_wrap.convert(nn.Sequential(*[_Kernel(conv) for _ in range(5)]), every=2)
    x = torch.randn(2, 4, 5, 5) if conv else torch.randn(2, 4)
    before = model(x).detach()
    lone = copy.deepcopy(model[1])
    with pytest.raises(CompatibilityError, match=r"between '0' and '2'\) was deep-copied without its neighbour"):
        lone(x)
    twin = copy.deepcopy(model)  # a whole copy is complete: same function, no error
    torch.testing.assert_close(twin(x), before, rtol=0, atol=0)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_copy_whose_neighbour_layers_were_swapped_names_the_surgery():
    # timm's reparameterize_model(model) (inplace=False, its default) deep-copies the whole model, then fuses
    # each block's layers into new ones, neighbours first: the copy was complete, the surgery made it lose what
    # its replaced blocks synthesize from. The message named only a partial copy.
    x = ResidualMLP.example()
    model = _trained(replace_wrap.convert(ResidualMLP(), every=2), x)
    before = model(x).detach()
    twin = copy.deepcopy(model)
    fused = nn.Linear(16, 32)  # the neighbour's layer swapped for a new one holding the same values
    fused.load_state_dict(twin.blocks[0].fc1.state_dict())
    twin.blocks[0].fc1 = fused
    with pytest.raises(CompatibilityError, match=r"\['blocks.0'\], or module surgery on the copy has since "
                       r"removed or swapped the neighbour layers .* reparameterize_model.* merge first"):
        twin(x)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # the original is untouched
    plain = replace_wrap.merge(copy.deepcopy(model))  # and the way the message gives works
    fused_plain = copy.deepcopy(plain)
    fused_plain.blocks[0].fc1 = copy.deepcopy(plain.blocks[0].fc1)
    torch.testing.assert_close(fused_plain(x), before, rtol=0, atol=0)


class _Holder:  # what a pipeline, a trainer or a training-state object is to deepcopy: a plain object
    def __init__(self, model):
        self.model, self.step = model, 3


class _Slotted:
    __slots__ = ("model",)


class _SlottedChild(_Slotted):  # its own __slots__ names none of the base's: the model is in a base's slot
    __slots__ = ("step",)

    def __init__(self, model):
        self.model, self.step = model, 3


TrainState = collections.namedtuple("TrainState", ["config", "model"])


@pytest.mark.parametrize("wrap, unwrap", [
    (lambda m: ({"lr": 1e-3}, m), lambda h: h[1]),
    (lambda m: TrainState({"lr": 1e-3}, m), lambda h: h.model),
    (lambda m: collections.deque([m]), lambda h: h[0]),
    (_SlottedChild, lambda h: h.model),
], ids=["tuple-config-first", "namedtuple", "deque", "base-class-slot"])
def test_a_deep_copy_of_a_container_holding_the_model_after_other_objects_is_complete(wrap, unwrap):
    # refused as "deep-copied without its neighbour block(s)": the memo's first entry (the config dict, copied
    # before the tuple that holds it and the model is memoized) was taken for the outermost object; deques and
    # slots of base classes were not searched
    x = ResidualMLP.example()
    model = _trained(replace_wrap.convert(ResidualMLP(), every=2), x)
    twin = unwrap(copy.deepcopy(wrap(model)))
    assert twin is not model
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert twin.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("wrap", [
    _Holder,
    lambda m: types.SimpleNamespace(state={"model": m}),
    lambda m: dataclasses.make_dataclass("State", ["model"])(m),
], ids=["object", "namespace", "dataclass"])
def test_a_deep_copy_of_an_object_holding_the_model_is_complete(wrap):
    # it was refused at first use as "deep-copied without its neighbour block(s)": only modules, lists and
    # dicts were searched for the neighbours
    x = ResidualMLP.example()
    model = _trained(replace_wrap.convert(ResidualMLP(), every=2), x)
    held = copy.deepcopy(wrap(model))
    twin = held.model if hasattr(held, "model") else held.state["model"]
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    before = model(x).detach()
    _trained(twin, x)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    lone = copy.deepcopy(_Holder(model.blocks[1])).model  # a holder of one replaced block is still refused
    with pytest.raises(CompatibilityError, match=r"without its neighbour block\(s\) \['blocks.0', 'blocks.2'\]"):
        lone(torch.randn(2, 16))


class _ModuleHolder(nn.Module):  # an ensemble or a wrapper that keeps its models out of its children
    def __init__(self, model, as_dict=False):
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.models = {"main": model} if as_dict else [model]  # a plain attribute: a list or dict is no child
        self.history = [[float(i)] * 4 for i in range(10)]


@pytest.mark.parametrize("as_dict", [False, True], ids=["list", "dict"])
def test_a_deep_copy_of_a_module_holding_the_model_in_a_plain_attribute_is_complete(as_dict):
    # refused at first use as "deep-copied without its neighbour block(s)": a module was searched through its
    # children only, not its plain attributes
    x = ResidualMLP.example()
    model = _trained(replace_wrap.convert(ResidualMLP(), every=2), x)
    held = copy.deepcopy(_ModuleHolder(model, as_dict))
    twin = held.models["main"] if as_dict else held.models[0]
    assert twin is not model
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    before = model(x).detach()
    _trained(twin, x)  # the copy trains its own neighbours, not the original's
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    lone = copy.deepcopy(_ModuleHolder(model.blocks[1], as_dict)).models  # one replaced block: still refused
    lone = lone["main"] if as_dict else lone[0]
    with pytest.raises(CompatibilityError, match=r"without its neighbour block\(s\) \['blocks.0', 'blocks.2'\]"):
        lone(torch.randn(2, 16))


def test_a_deep_copy_of_a_holder_is_walked_once_for_all_its_replaced_layers(monkeypatch):
    # every replaced layer of the copy walked the whole holder again at its first use: with a holder that also
    # holds data (a tokenized dataset as Python lists), the first forward cost (replaced layers) x (holder size)
    from replace_wrap.surgery import sources

    walks = []
    walk = sources._modules_of
    monkeypatch.setattr(sources, "_modules_of", lambda root: (walks.append(root), walk(root))[1])
    x = ResidualMLP.example()
    model = replace_wrap.convert(ResidualMLP(), every=2)
    held = copy.deepcopy(types.SimpleNamespace(model=model, data=[[1000 + i] * 8 for i in range(100)]))
    lone = copy.deepcopy(_Holder(model.blocks[1])).model  # another copy: checked on its own
    torch.testing.assert_close(held.model(x), model(x), rtol=0, atol=0)
    assert len(walks) == 1
    with pytest.raises(CompatibilityError, match=r"without its neighbour block\(s\)"):
        lone(torch.randn(2, 16))
    assert len(walks) == 2


def test_nn_data_parallel_replicas_are_refused():
    model = replace_wrap.convert(ResidualMLP(), every=2)
    # what nn.parallel.replicate does to every module (the device copies need CUDA; the refusal does not)
    replica = model.blocks[1].fc1._replicate_for_data_parallel()
    with pytest.raises(CompatibilityError, match="DataParallel"):
        replica.weight


@pytest.mark.parametrize("make, x", [
    (lambda: ResidualMLP(), ResidualMLP.example()),
    (lambda: StagedCNN(), torch.randn(2, 3, 16, 16)),  # stage boundaries: shape-adapted neighbours
], ids=["mlp", "staged-cnn"])
@pytest.mark.parametrize("scalars", ["block", "tensor"])
def test_fx_traces_the_synthesis_and_keeps_the_scalars_as_parameters(make, x, scalars):
    model = _trained(replace_wrap.convert(make(), every=2, scalars=scalars), x).eval()
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), model(x))
    scalars_ = {f"{path}.replacement.{n}" for path, _, site in sites(model)
             for n, _ in site.named_parameters()}
    assert scalars_ and scalars_ <= set(gm.state_dict())
    assert scalars_ <= {n for n, _ in gm.named_parameters()}
    # the graph reads the live scalars: a change to them changes the GraphModule's output as the model's
    with torch.no_grad():
        for _, _, site in sites(model):
            site.a.mul_(1.5)
    torch.testing.assert_close(gm(x), model(x))


def test_fx_keeps_a_stateful_rule_live():
    """The graph calls the replaced layers themselves: a rule with state (ema) keeps updating in the GraphModule."""
    x = ResidualMLP.example()
    model = replace_wrap.convert(ResidualMLP(), every=2, rule="ema")
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), model(x))
    _trained(gm, x, steps=3)  # trains the shared modules and scalars through the GraphModule
    torch.testing.assert_close(gm(x), model(x))


def test_a_deep_copy_of_a_graph_module_of_a_converted_model_is_complete():
    x = ResidualMLP.example()
    model = _trained(replace_wrap.convert(ResidualMLP(), every=2), x)
    gm = copy.deepcopy(torch.fx.symbolic_trace(model))
    torch.testing.assert_close(gm(x), model(x))
