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
    _assert_same(_run(model, x, fast_path=False, **options), _run(model, x, ab_grad_sample="exact", **options))


@pytest.mark.parametrize("sample", ["auto", 0.25])
@pytest.mark.parametrize("toy", sorted(TOYS))
def test_sampled_path_changes_only_the_scalar_gradients(toy, sample):
    cls = TOYS[toy]
    model, x = cls(), cls.example()
    ref = _run(model, x, fast_path=False)
    got = _run(model, x) if sample == "auto" else _run(model, x, ab_grad_sample=sample)  # "auto": the default
    scalars = {k for k in ref[3] if ".replacement." in k}
    _assert_same(ref, got, keys=sorted(set(ref[3]) - scalars))  # detached: nothing else depends on them
    for k in scalars:
        assert torch.isfinite(got[3][k]).all() and got[3][k].abs().sum() > 0, k


def test_timm_vit_fast_path_equals_generic():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    ref, got = _run(model, x, fast_path=False), _run(model, x, ab_grad_sample=None)
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
    # the sampled estimator under FSDP2 reads a linear map's weight in one of two layouts; nothing else is one
    before = leaves.list_layer_kernels()
    with pytest.raises(RegistryError, match=r"sharded must be one of \(None, 'out_in', 'in_out'\), got 'rows'"):
        leaves.register_layer_kernel(OwnForwardLinear, name="bad_layout", sharded="rows")(lambda leaf, x: NotImplemented)
    assert leaves.list_layer_kernels() == before  # nothing registered
    assert leaves.kernel_for(nn.Linear, ("bias", "weight")).sharded == "out_in"
    assert leaves.kernel_for(nn.Conv2d, ("weight",)).sharded is None  # convolutions: exact under FSDP2


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


# --- the synthesized weight: one per forward, nothing kept on the layer -----------------------------------


def test_each_forward_keeps_its_own_weight_and_nothing_stays_on_the_layer():
    model = replace_wrap.convert(ResidualMLP(), every=2)
    ref = replace_wrap.convert(ResidualMLP(), every=2, fast_path=False)
    ref.load_state_dict(model.state_dict())
    leaf = model.blocks[1].fc1
    x1, x2 = ResidualMLP.example(), ResidualMLP.example()
    for m in (model, ref):
        # two forwards before their backwards, the neighbour's weight changed in between (a new tensor: the
        # first graph keeps the old one), so the second forward synthesizes another weight for block 1
        l1 = m(x1).square().mean()
        m.blocks[0].fc1.weight = nn.Parameter(m.blocks[0].fc1.weight.detach() + 0.1)
        l2 = m(x2).square().mean()
        (l1 + l2).backward(retain_graph=True)
        # a kept graph's second backward, after yet another forward, still sees its own weights
        m(x2 + 1).square().mean().backward()
        l1.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if ".replacement." not in n and p.grad is not None:  # the scalars' gradients are sampled in `model`
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    # no weight-sized state rides on the layer between steps (the weight buffer of 0.2 dev is gone: measured
    # to save nothing, see docs/benchmarks.md), and nothing is left behind by merge
    sizes = [v.numel() for v in leaf.__dict__.values() if isinstance(v, torch.Tensor)]
    assert not sizes or max(sizes) < leaf.weight.numel()
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


def _params_and_saved(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the parameters plus what one forward keeps for the backward, each storage once."""
    seen = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
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
    variants = {"generic": {"fast_path": False}, "exact": {"ab_grad_sample": "exact"}, "default": {},
                "recompute": {"recompute": True}}
    models = {name: replace_wrap.convert(copy.deepcopy(base), every=2, **opts) for name, opts in variants.items()}
    sizes.update({name: _saved_bytes(m, x) for name, m in models.items()})
    assert sizes["recompute"] < sizes["freeze"], sizes
    # the default keeps 16 of 256 rows of each replaced layer's input more than freezing does; the exact path all
    assert sizes["default"] < sizes["exact"] <= sizes["generic"], sizes
    assert sizes["default"] <= sizes["freeze"] * 1.1, sizes
    # parameters included: a replaced block keeps no weight from its forward to its backward (the backward
    # synthesizes it again), where a frozen block holds its own tensors all along
    total = {"freeze": _params_and_saved(frozen, x), "default": _params_and_saved(models["default"], x)}
    synthesized = sum(p.numel() * 4 for b in replace_wrap.plan(base, every=2).replaced
                      for p in (base.get_parameter(f"{b.path}.{r}") for r in b.synthesized))
    assert total["default"] < total["freeze"] - synthesized / 2, (total, synthesized)


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


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2 hands its blocks the cache positionally
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_recompute_with_a_kv_cache_runs_the_block_once(attn, family):
    """An HF decoder called in training with its default cache (use_cache=True) hands each block the cache: a
    backward replay would append to it a second time (eager attention: RuntimeError in the backward; sdpa: the
    returned cache holds the replaced layers' tokens twice). Such a call is not recomputed, and says so."""
    transformers = pytest.importorskip("transformers")
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=5, n_head=4, n_positions=32)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    base = (transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel)(cfg)
    x = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    results = {}
    for recompute in (False, True):
        m = replace_wrap.convert(copy.deepcopy(base), every=2, recompute=recompute, ab_grad_sample="exact").train()
        torch.manual_seed(1)  # (GPT-2's dropout: the same masks in both runs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = m(input_ids=x, labels=x)
            out.loss.backward()
        told = [str(w.message) for w in caught if "use_cache=False" in str(w.message)]
        assert bool(told) == recompute, told
        assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [8] * 5
        results[recompute] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    for k in results[False]:
        torch.testing.assert_close(results[True][k], results[False][k], rtol=0, atol=0, msg=k)
    with warnings.catch_warnings():  # without a cache the blocks are recomputed, and nothing is said
        warnings.simplefilter("error")
        m(input_ids=x, labels=x, use_cache=False).loss.backward()


# --- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ab_grad_sample": 0}, "ab_grad_sample must be 'auto', 'exact' \\(or None\\) or a fraction in \\(0, 1\\], got 0"),
        ({"ab_grad_sample": "fast"}, "got 'fast'"),
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


# --- shape-adapted neighbours and Hugging Face Conv1D take the kernels too ---------------------------------


@pytest.mark.parametrize("grad", ["detached", "coupled"])
def test_shape_adapted_layers_take_the_kernel_with_the_generic_path_gradients(grad):
    from toys import StagedCNN

    model, x = StagedCNN(), StagedCNN.example()
    ref = _run(model, x, fast_path=False, neighbour_grad=grad)
    got = _run(model, x, ab_grad_sample="exact", neighbour_grad=grad)
    _assert_same(ref, got)
    routes = [r for b in replace_wrap.report(got[0]).replaced for r in b.layers if r.layer == "Conv2d"]
    assert routes and all(r.route.startswith("kernel 'conv'") for r in routes)
    assert any("shape-adapted" in r.route for r in routes)
    conv_grads = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: conv_grads.add(type(o.grad_fn).__name__))
             for b in replace_wrap.report(got[0]).replaced for m in got[0].get_submodule(b.path).modules()
             if isinstance(m, nn.Conv2d)]
    got[0](x)
    for h in hooks:
        h.remove()
    assert conv_grads == {"_MixedConvBackward"}


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=5, n_embd=16, n_head=2, vocab_size=40, n_positions=24, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


class _Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def test_hf_gpt2_conv1d_kernel():
    model = _Logits(_tiny_gpt2())
    ids = torch.randint(0, 40, (3, 20))  # 60 rows: "auto" samples 32 of them
    ref = _run(model, ids, fast_path=False)
    _assert_same(ref, _run(model, ids, ab_grad_sample="exact"), atol=1e-6)
    got = _run(model, ids)  # the default: sampled scalar gradients, everything else as the generic path
    scalars = {k for k in ref[3] if ".replacement." in k}
    _assert_same(ref, got, keys=sorted(set(ref[3]) - scalars))
    assert all(not torch.equal(got[3][k], ref[3][k]) for k in scalars)  # sampled, so not the exact values
    routes = {r.path: r for b in replace_wrap.report(got[0]).replaced for r in b.layers}
    assert routes["attn.c_attn"].route == "kernel 'hf_conv1d'" and routes["mlp.c_proj"].layer == "Conv1D"
    assert routes["attn.c_attn"].estimator.startswith("sampled: m = max(16, N/64) of N rows")
    assert routes["ln_1"].generic and routes["ln_1"].estimator == "exact (autograd): no layer kernel for LayerNorm"
    assert leaves.kernel_for(type(got[0].model.transformer.h[1].attn.c_attn).__mro__[1], ("bias", "weight")).name == \
        "hf_conv1d"


def test_kernel_types_by_import_path_resolve_only_once_imported():
    class Late(nn.Module):  # stands for a class of a module that is not imported yet
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.weight

    leaves.register_layer_kernel("no_such_pkg_xyz.mod.Late", name="test_by_path")(lambda layer, x: NotImplemented)
    try:
        assert leaves.kernel_for(Late, ("weight",)) is None  # the module is not in sys.modules: nothing resolves
        import sys
        import types

        fake = types.ModuleType("no_such_pkg_xyz.mod")
        fake.Late = Late
        sys.modules["no_such_pkg_xyz.mod"] = fake
        leaves._LOOKUP.clear()
        try:
            assert leaves.kernel_for(Late, ("weight",)).name == "test_by_path"
        finally:
            del sys.modules["no_such_pkg_xyz.mod"]
    finally:
        _unregister("test_by_path")
    with pytest.raises(RegistryError, match="'package.module.Class' paths"):
        leaves.register_layer_kernel("NotDotted")
