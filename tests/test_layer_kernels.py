"""The fast path inside converted models: leaf handlers, the sampled estimator, the recompute mode, and the
config options that choose them. The reference is always the generic property path (fast_path=False)."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import replace_wrap
from replace_wrap import ConfigError, RegistryError
from replace_wrap.synthesis import layer_kernels as leaves
from replace_wrap.surgery.swap import base_class
from toys import ConvNet, ResidualMLP, TinyTransformer

TOYS = {"mlp": ResidualMLP, "conv-bn": ConvNet, "transformer": TinyTransformer}


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model: nn.Module, x: torch.Tensor, **options):
    """Convert a copy, one forward/backward; output, input grad and every trainable parameter's grad."""
    m = copy.deepcopy(model)
    with warnings.catch_warnings():  # recompute with BatchNorm warns about its statistics: known here
        warnings.simplefilter("ignore", UserWarning)
        replace_wrap.convert(m, every=2, **options)
    m.train()
    xx = x.clone().requires_grad_() if x.is_floating_point() else x
    y = m(xx)
    y.float().square().mean().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    return m, y.detach(), (xx.grad if x.is_floating_point() else None), grads


def _assert_same(ref, got, keys=None, atol=1e-6):
    _, y0, gx0, g0 = ref
    _, y1, gx1, g1 = got
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    if gx0 is not None:
        torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=atol)
    assert set(g0) == set(g1)
    for k in keys if keys is not None else g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=atol, msg=k)


OPTION_SETS = [
    {},
    {"neighbour_grad": "coupled"},
    {"rule": "convex", "scalars": "tensor"},
    {"recompute": True},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("toy", sorted(TOYS))
def test_fast_path_equals_generic_path(toy, options):
    cls = TOYS[toy]
    model, x = cls(), cls.example()
    _assert_same(_run(model, x, fast_path=False, **options), _run(model, x, **options))


@pytest.mark.parametrize("toy", sorted(TOYS))
def test_sampled_path_changes_only_the_scalar_gradients(toy):
    cls = TOYS[toy]
    model, x = cls(), cls.example()
    ref = _run(model, x, fast_path=False)
    got = _run(model, x, ab_grad_sample=0.25)
    scalars = {k for k in ref[3] if ".replacement." in k}
    _assert_same(ref, got, keys=sorted(set(ref[3]) - scalars))  # detached: nothing else depends on them
    for k in scalars:
        assert torch.isfinite(got[3][k]).all() and got[3][k].abs().sum() > 0, k


def test_timm_vit_fast_path_equals_generic():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    ref, got = _run(model, x, fast_path=False), _run(model, x)
    _assert_same(ref, got, atol=1e-5)
    rec = _run(model, x, recompute=True, ab_grad_sample=0.5)
    _assert_same(ref, rec, keys=[k for k in ref[3] if ".replacement." not in k], atol=1e-5)


def _grad_fn_names(model: nn.Module, x: torch.Tensor) -> set[str]:
    names: set[str] = set()

    def record(module, args, out):
        fn = out.grad_fn
        while fn is not None and type(fn).__name__ == "ViewBackward0":  # the kernel's rows reshaped back
            fn = fn.next_functions[0][0]
        if fn is not None:
            names.add(type(fn).__name__)

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    model(x)
    for h in handles:
        h.remove()
    return names


def test_handler_is_used_only_where_it_applies():
    model = ResidualMLP()
    replace_wrap.convert(model, every=2)
    assert "_MixedLinearBackward" in _grad_fn_names(model, ResidualMLP.example())
    generic = replace_wrap.convert(ResidualMLP(), every=2, fast_path=False)
    assert "_MixedLinearBackward" not in _grad_fn_names(generic, ResidualMLP.example())
    with torch.no_grad():  # nothing to save: the generic path serves inference
        assert model(ResidualMLP.example()).grad_fn is None
    leaf = model.blocks[1].fc1
    assert isinstance(leaf.weight, torch.Tensor) and leaf.weight.shape == (32, 16)  # still a property
    assert base_class(leaf) is nn.Linear and type(leaf).__name__ == "Linear"


class OwnForwardLinear(nn.Linear):
    """A subclass that computes something else: it must keep the generic path."""

    def forward(self, x):
        return super().forward(x) * 2


class PlainSubclassLinear(nn.Linear):
    pass


def test_lookup_rules():
    assert leaves.kernel_for(nn.Linear, ("bias", "weight")).name == "linear"
    assert leaves.kernel_for(PlainSubclassLinear, ("weight",)).name == "linear"  # same forward: served
    assert leaves.kernel_for(OwnForwardLinear, ("bias", "weight")) is None  # own forward: generic
    assert leaves.kernel_for(nn.Linear, ("bias",)) is None  # the weight is not synthesized
    assert leaves.kernel_for(nn.Conv2d, ("weight",)).name == "conv"
    assert leaves.list_layer_kernels()[:2] == ["linear", "conv"]  # built-ins first: first match wins


def test_registry_errors():
    with pytest.raises(RegistryError, match="already has the layer kernel 'linear'"):
        leaves.register_layer_kernel(nn.Linear, name="another_linear")(lambda leaf, x: NotImplemented)
    with pytest.raises(RegistryError, match="named 'conv' is already registered"):
        leaves.register_layer_kernel(OwnForwardLinear, name="conv")(lambda leaf, x: NotImplemented)
    with pytest.raises(RegistryError, match="nn.Module subclasses"):
        leaves.register_layer_kernel(int)


def _gate_class() -> type[nn.Module]:
    """A fresh elementwise layer type, so each test registers its kernel for a type no other kernel serves."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.weight

    return Gate


def test_user_handler_and_declining():
    Gate = _gate_class()  # a class of its own: one kernel per type

    calls = []

    @leaves.register_layer_kernel(Gate, name="test_gate")
    def gate_forward(leaf, x):
        calls.append(x.shape)
        return NotImplemented if x.shape[0] == 1 else x * leaf.weight + 0  # same maths via the property

    try:
        net = nn.Sequential(*[Gate() for _ in range(5)])
        ref = copy.deepcopy(net)
        replace_wrap.convert(net, every=2)
        replace_wrap.convert(ref, every=2, fast_path=False)
        for batch in (1, 3):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(net(x), ref(x))
        assert calls  # the handler ran (and declined for batch 1)
    finally:
        _unregister("test_gate")


# --- the reusable weight buffer ------------------------------------------------------------------------------


def test_weight_buffer_is_reused_across_steps_and_never_while_a_graph_holds_it():
    model = replace_wrap.convert(ResidualMLP(), every=2, ab_grad_sample=0.5)
    ref = replace_wrap.convert(ResidualMLP(), every=2, fast_path=False)
    ref.load_state_dict(model.state_dict())
    leaf = model.blocks[1].fc1
    x1, x2 = ResidualMLP.example(), ResidualMLP.example()
    model(x1).square().mean().backward()
    buf = leaf.__dict__[leaves.CACHE_PREFIX + "weight"]
    ptr = buf.data_ptr()
    model.zero_grad()
    model(x2).square().mean().backward()  # the previous graph is gone: the same buffer serves again
    assert leaf.__dict__[leaves.CACHE_PREFIX + "weight"].data_ptr() == ptr
    # two forwards before their backwards: the second must not overwrite the weight the first one saved
    for m in (model, ref):
        m.zero_grad()
        l1 = m(x1).square().mean()
        # the neighbour's weight changes between the two forwards (a new tensor: the first graph keeps the
        # old one), so the second forward synthesizes another weight for block 1
        m.blocks[0].fc1.weight = nn.Parameter(m.blocks[0].fc1.weight.detach() + 0.1)
        l2 = m(x2).square().mean()
        (l1 + l2).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if ".replacement." not in n and p.grad is not None:  # the scalars' gradients are sampled in `model`
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    # caches are neither pickled nor kept by merge
    assert not any(k.startswith(leaves.CACHE_PREFIX) for k in copy.deepcopy(leaf).__dict__)
    replace_wrap.merge(model)
    assert not any(k.startswith(leaves.CACHE_PREFIX) for k in leaf.__dict__)


# --- recompute ---------------------------------------------------------------------------------------------


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of tensors autograd keeps for the backward, parameters excluded (they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).square().mean().backward()
    return sum(seen.values())


def test_saved_memory_ordering():
    """What the backward keeps: recompute < sampled <= freeze < generic, on the same blocks."""
    torch.manual_seed(0)
    base = ResidualMLP(depth=7, width=64)
    x = torch.randn(256, 8)
    frozen = copy.deepcopy(base)
    for b in replace_wrap.plan(frozen, every=2).replaced:
        frozen.get_submodule(b.path).requires_grad_(False)
    sizes = {"freeze": _saved_bytes(frozen, x)}
    for name, opts in {"generic": {"fast_path": False}, "exact": {}, "sampled": {"ab_grad_sample": 1 / 16},
                       "recompute": {"recompute": True, "ab_grad_sample": 1 / 16}}.items():
        sizes[name] = _saved_bytes(replace_wrap.convert(copy.deepcopy(base), every=2, **opts), x)
    assert sizes["recompute"] < sizes["freeze"], sizes
    # sampled keeps a sixteenth of each replaced layer's input more than freezing does, and the synthesized
    # weights, which take the place of the frozen blocks' own parameters
    assert sizes["sampled"] < sizes["exact"] <= sizes["generic"], sizes
    assert sizes["sampled"] <= sizes["freeze"] * 1.2, sizes


def test_recompute_class_swap_is_reversible_and_picklable():
    model = ResidualMLP()
    ref = copy.deepcopy(model)
    replace_wrap.convert(model, every=2, recompute=True, ab_grad_sample=0.5)
    block = model.blocks[1]
    assert type(block).__name__ == "ResidualMLPBlock" and base_class(block) is type(ref.blocks[1])
    twin = pickle.loads(pickle.dumps(model))
    x = ResidualMLP.example()
    torch.testing.assert_close(twin(x), model(x))
    twin(x).square().mean().backward()
    assert twin.blocks[1].replacement.a.grad is not None
    replace_wrap.merge(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]


def test_recompute_replays_the_same_samples_and_dropout():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, batch_first=True)
    net = nn.Sequential(*[copy.deepcopy(layer) for _ in range(5)])
    x = torch.randn(3, 7, 16)
    results = []
    for recompute in (False, True):
        m = replace_wrap.convert(copy.deepcopy(net), every=2, ab_grad_sample=0.25, recompute=recompute)
        torch.manual_seed(5)
        m(x).square().mean().backward()
        results.append({n: p.grad for n, p in m.named_parameters()})
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-6, msg=k)


# --- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ab_grad_sample": 0}, "ab_grad_sample must be None \\(exact\\) or a fraction in \\(0, 1\\], got 0"),
        ({"ab_grad_sample": 1.5}, "got 1.5"),
        ({"ab_grad_sample": True}, "got True"),
        ({"ab_grad_sample": 0.1, "fast_path": False}, "needs fast_path=True"),
        ({"fast_path": 1}, "fast_path must be True or False, got 1"),
        ({"recompute": "yes"}, "recompute must be True or False, got 'yes'"),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        replace_wrap.ReplaceConfig(**options)
    model = ResidualMLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        replace_wrap.convert(model, every=2, **options)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@settings(max_examples=30, deadline=None)
@given(
    fast=st.booleans(),
    sample=st.one_of(st.none(), st.floats(1e-4, 1.0)),
    recompute=st.booleans(),
    coupled=st.booleans(),
)
def test_config_round_trip(fast, sample, recompute, coupled):
    if sample is not None and not fast:
        return
    cfg = replace_wrap.ReplaceConfig(fast_path=fast, ab_grad_sample=sample, recompute=recompute,
                                     neighbour_grad="coupled" if coupled else "detached")
    import json

    assert replace_wrap.ReplaceConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _unregister(name: str) -> None:
    leaves._KERNELS[:] = [k for k in leaves._KERNELS if k.name != name]
    leaves._LOOKUP.clear()


class ReflectConv(nn.Conv2d):
    """Customizes only _conv_forward (reflect padding by hand): the kernel must not take it over."""

    def _conv_forward(self, input, weight, bias):
        return F.conv2d(F.pad(input, (1, 1, 1, 1), mode="reflect"), weight, bias, self.stride, 0)


class InitOnlyConv(nn.Conv2d):
    """Changes only how it is built: still an nn.Conv2d computation, so the kernel serves it."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def test_a_subclass_that_redefines_any_computing_method_keeps_its_computation():
    assert leaves.kernel_for(ReflectConv, ("bias", "weight")) is None
    assert leaves.kernel_for(InitOnlyConv, ("bias", "weight")).name == "conv"
    net = nn.Sequential(*[ReflectConv(3, 3, 3) for _ in range(5)])
    x = torch.randn(2, 3, 6, 6)
    replace_wrap.convert(net, every=2)
    out = net(x)
    # oracle: the same stack with each replaced layer's weight written out by hand
    want = x
    for i, layer in enumerate(net):
        w, bias = layer.weight, layer.bias
        if i in (1, 3):
            a, b = net[i].replacement.a, net[i].replacement.b
            w = a * net[i - 1].weight + b * net[i + 1].weight
            bias = a * net[i - 1].bias + b * net[i + 1].bias
        want = F.conv2d(F.pad(want, (1, 1, 1, 1), mode="reflect"), w, bias)
    torch.testing.assert_close(out, want)
    assert "_MixedConvBackward" not in _grad_fn_names(net, x)


def test_a_kernel_registered_after_conversion_serves_the_converted_layers():
    Gate = _gate_class()  # a class of its own: one kernel per type

    net = replace_wrap.convert(nn.Sequential(*[Gate() for _ in range(5)]), every=2)
    x = torch.randn(3, 4)
    before = net(x)
    calls = []

    @leaves.register_layer_kernel(Gate, name="test_late_gate")
    def late(layer, x):
        calls.append(1)
        return x * layer.weight

    try:
        torch.testing.assert_close(net(x), before)
        assert len(calls) == 2  # blocks 1 and 3
    finally:
        _unregister("test_late_gate")
    net(x)
    assert len(calls) == 2  # unregistered: the generic path again
