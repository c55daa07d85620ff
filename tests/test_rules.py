"""Integration rules: the registry's validation, the EMA rule's semantics, and the merge contract for every rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import replace_wrap
from conftest import TOL
from replace_wrap import ConfigError, IntegrationRule, RegistryError, register_rule
from replace_wrap.synthesis.rules import EMARule, get_rule, list_rules
from toys import ConvNet, ResidualMLP, TinyTransformer


pytestmark = pytest.mark.usefixtures("one_thread")



class BilinearRule(IntegrationRule):
    """A user-defined rule beyond a linear mix: ``a * prev + b * next + c * prev * next``."""

    def init_params(self, n, init):
        return {"a": torch.full((n,), init[0]), "b": torch.full((n,), init[1]), "c": torch.zeros(n)}

    def coefficients(self, site):
        return site.a, site.b

    def synthesize(self, site, index, prev, next):
        return site.a[index] * prev + site.b[index] * next + site.c[index] * prev * next


USER_RULE = "test_bilinear"  # registered by the `rule` fixture for the length of one test


@pytest.fixture(params=[*list_rules(), USER_RULE])
def rule(request, rule_registry):
    if request.param == USER_RULE:
        register_rule(USER_RULE)(type("Bilinear", (BilinearRule,), {}))
    return request.param


# --- the contract, for every registered rule (and a user-defined one) ---------------------------------

MODELS = {
    "mlp": (lambda: ResidualMLP(depth=6), lambda: ResidualMLP.example(4)),
    "convbn": (lambda: ConvNet(depth=5), lambda: ConvNet.example(2)),
    "transformer": (lambda: TinyTransformer(depth=5), lambda: TinyTransformer.example(2)),
}


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, replace_wrap.ReplacementSite):
                for p in m.parameters():
                    p.copy_(p + torch.rand(p.shape, generator=g) * 0.6 - 0.3)


def _train(model, x, steps=3):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_merge_equals_converted_for_every_rule(rule, kind):
    make, example = MODELS[kind]
    model, x = make(), example()
    original_keys = list(model.state_dict())
    replace_wrap.convert(model, every=2, rule=rule)
    _perturb(model)
    _train(model, x)  # stateful rules (ema) must have moved their state before the merge
    model.eval()
    with torch.no_grad():
        y = model(x).clone()
    replace_wrap.merge(model)
    assert list(model.state_dict()) == original_keys
    assert not any(isinstance(m, replace_wrap.ReplacementSite) for m in model.modules())
    with torch.no_grad():
        assert (model(x) - y).abs().max().item() <= TOL["merge"]


def test_rule_state_round_trips(rule):
    model, x = ResidualMLP(depth=6), ResidualMLP.example(4)
    twin = copy.deepcopy(model)
    replace_wrap.convert(model, every=2, rule=rule)
    _perturb(model)
    _train(model, x)
    state = model.state_dict()
    replace_wrap.convert(twin, every=2, rule=rule)
    assert list(twin.state_dict()) == list(state)
    twin.load_state_dict(state)
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(copy.deepcopy(model)(x), model(x), atol=0, rtol=0)


def test_trainable_count_and_gradients(rule):
    model, x = ResidualMLP(depth=6), ResidualMLP.example(4)
    original = copy.deepcopy(model)
    replace_wrap.convert(model, every=2, rule=rule)
    rep = replace_wrap.report(model)
    per_site = sum(t.numel() for t in get_rule(rule).init_params(1, (0.5, 0.5)).values())
    saved = sum(original.get_submodule(b.path).get_parameter(t).numel() for b in rep.replaced for t in b.synthesized)
    after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert after == rep.trainable_after == rep.trainable_before - saved + per_site * len(rep.replaced)
    model(x).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


# --- the EMA rule --------------------------------------------------------------------------------------


def _ema_model(**options):
    model = ResidualMLP(depth=5)
    original = copy.deepcopy(model)
    replace_wrap.convert(model, policy=replace_wrap.Indices([2]), rule="ema", **options)
    return original, model, model.blocks[2].replacement


def test_ema_starts_as_the_original_model():
    original, model, site = _ema_model()
    x = ResidualMLP.example(8)
    model.eval(), original.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=0, rtol=0)
    assert sorted(n for n, _ in site.named_parameters()) == ["a", "b", "scale"]
    assert len([n for n, _ in site.named_buffers() if n.startswith("shadow_")]) == len(site.tensor_names)


def test_ema_updates_once_per_step():
    _, model, site = _ema_model()
    x = ResidualMLP.example(8)
    m = EMARule.momentum
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    shadow = site.shadow_2.clone()  # fc1.weight (LayerNorm weight and bias come first)
    assert site.tensor_names[2] == "fc1.weight"
    model(x).square().mean().backward()  # the first access only records the target
    model(x).square().mean().backward()  # gradient accumulation: same target, no update
    assert torch.equal(site.shadow_2, shadow)
    opt.step()
    opt.zero_grad()
    model.eval()
    model(x)  # eval never moves the shadow
    assert torch.equal(site.shadow_2, shadow)
    model.train()
    with torch.no_grad():  # a training forward without gradients (reentrant checkpointing runs so): it updates
        model(x)
    target = site.a.detach() * model.blocks[1].fc1.weight.detach() + site.b.detach() * model.blocks[3].fc1.weight.detach()
    expected = m * shadow + (1 - m) * target
    torch.testing.assert_close(site.shadow_2, expected)
    after_one = site.shadow_2.clone()
    model(x).square().mean().backward()  # the same target again: exactly one update per step
    assert torch.equal(site.shadow_2, after_one)
    assert site.scale.grad is not None and site.a.grad is not None and site.b.grad is not None


def test_ema_merge_reads_the_shadow_without_moving_it():
    _, model, site = _ema_model()
    x = ResidualMLP.example(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()  # the target moved: a training forward now would update
    model.eval()
    expected = model(x)
    replace_wrap.merge(model.train())  # merged in training mode, still the eval function
    torch.testing.assert_close(model.eval()(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_ema_checkpointing_recompute_sees_the_same_shadow(reentrant):
    """Reentrant checkpointing runs the forward without gradients and replays it with them: the shadow must be
    the same in both, as without checkpointing (issue 11, defect 4)."""
    x = ResidualMLP.example(8)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        _, model, site = _ema_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        for _ in range(3):
            opt.zero_grad()
            h = model.proj(x)
            for blk in model.blocks:
                h = checkpoint(blk, h, use_reentrant=reentrant) if use_checkpoint else blk(h)
            model.head(h).square().mean().backward()
            opt.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        grads[-1]["shadow"] = site.shadow_2.clone()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["detached", "coupled"])
def test_ema_neighbour_gradient(mode):
    _, model, site = _ema_model(neighbour_grad=mode)
    model.train()
    leaf = model.blocks[2].fc1
    w = leaf.weight
    prev = model.blocks[1].fc1.weight
    (g_prev,) = torch.autograd.grad(w.sum(), [prev], allow_unused=True)
    if mode == "detached":
        assert g_prev is None
    else:  # the derivative of the next shadow: (1 - momentum) * a * scale
        expected = (1 - EMARule.momentum) * site.a.item() * site.scale.item()
        torch.testing.assert_close(g_prev, torch.full_like(prev, expected))


def test_ema_variant_by_subclass(rule_registry):
    @register_rule("test_ema_fast")
    class FastEMA(EMARule):
        momentum = 0.5

    model = ResidualMLP(depth=5)
    replace_wrap.convert(model, every=2, rule="test_ema_fast")
    site = model.blocks[1].replacement
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = ResidualMLP.example(4)
    before = site.shadow_2.clone()
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    target = site.a.detach() * model.blocks[0].fc1.weight.detach() + site.b.detach() * model.blocks[2].fc1.weight.detach()
    model(x)
    assert not torch.equal(site.shadow_2, before)
    assert (site.shadow_2 - target).abs().max() < (before - target).abs().max()

    @register_rule("test_ema_bad")
    class BadEMA(EMARule):
        momentum = 1.0

    with pytest.raises(ConfigError, match=r"rule 'test_ema_bad': momentum must be a number in \[0, 1\), got 1\.0"):
        replace_wrap.ReplaceConfig(rule="test_ema_bad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ema_and_similarity_on_cuda():
    model = ResidualMLP(depth=6).cuda()
    x = ResidualMLP.example(8).cuda()
    replace_wrap.convert(model, policy=replace_wrap.Similarity(every=2), rule="ema")
    site = model.blocks[1].replacement
    assert site.shadow_0.device.type == "cuda" and site.a.device.type == "cuda"
    _train(model, x)
    model.eval()
    with torch.no_grad():
        y = model(x).clone()
    replace_wrap.merge(model)
    with torch.no_grad():
        assert (model(x) - y).abs().max().item() <= 1e-5


# --- the registry ----------------------------------------------------------------------------------


def test_user_rule_end_to_end(rule_registry):
    @register_rule("test_half_sum")
    class HalfSum(IntegrationRule):
        """One learnable scalar c: W = c * (prev + next)."""

        def init_params(self, n, init):
            return {"c": torch.full((n,), (init[0] + init[1]) / 2)}

        def coefficients(self, site):
            return site.c, site.c

    assert "test_half_sum" in replace_wrap.list_rules()
    model = ResidualMLP(depth=5)
    replace_wrap.convert(model, every=2, rule="test_half_sum")
    assert [n for n, _ in model.blocks[1].replacement.named_parameters()] == ["c"]
    assert replace_wrap.report(model).replaced[0].scalars == {"a": [0.5], "b": [0.5]}


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("1bad", {}, r"a rule name must be a Python identifier, got '1bad'"),
        ("test_x", None, r"@register_rule\('test_x'\) needs an IntegrationRule subclass, got <class 'object'>"),
        ("linear", {}, r"an integration rule named 'linear' is already registered \(LinearRule\); choose another"),
        ("test_x", {"coefficients": lambda self, site: (site.a, site.b)},
         r"@register_rule\('test_x'\) on Custom: the rule must define init_params\(\)"),
        ("test_x", {"init_params": lambda self, n, init: {}},
         r"the rule must define coefficients\(\) \(see replace_wrap\.IntegrationRule; coefficients\(\) returns"),
        ("test_x", {"init_params": lambda self, n: {}, "coefficients": lambda self, site: (site.a, site.b)},
         r"on Custom: init_params\(self, n\) has the wrong signature; it is called as init_params\(self, n, init\)"),
        ("test_x", {"init_params": lambda self, n, init: {}, "coefficients": lambda self, site: (site.a, site.b),
                    "synthesize": lambda self, site, i, prev, next, extra: prev},
         r"synthesize\(self, site, i, prev, next, extra\) has the wrong signature"),
        ("test_x", {"init_params": lambda self, n, init: {}, "coefficients": lambda self, site: (site.a, site.b),
                    "affine": "yes"}, r"the class attribute affine must be True or False, got 'yes'"),
    ],
)
def test_registration_errors(rule_registry, name, body, message):
    cls = object if body is None else type("Custom", (IntegrationRule,), body)
    with pytest.raises(RegistryError, match=message):
        register_rule(name)(cls)


def test_unknown_rule_errors():
    with pytest.raises(RegistryError, match=r"unknown integration rule 'nope'; registered rules: convex, ema, linear"):
        get_rule("nope")
    with pytest.raises(ConfigError, match=r"unknown integration rule 'nope'.*@replace_wrap\.register_rule\(name\)"):
        replace_wrap.convert(ResidualMLP(depth=5), rule="nope")


def test_rule_with_wrong_shape_is_refused_and_model_untouched(rule_registry):
    @register_rule("test_wrong_shape")
    class WrongShape(IntegrationRule):
        def init_params(self, n, init):
            return {"a": torch.full((n,), init[0])}

        def coefficients(self, site):
            return site.a, site.a

        def synthesize(self, site, index, prev, next):
            return prev.flatten()

    model = ResidualMLP(depth=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    # the LayerNorm tensors are already flat: the first mismatch is fc1.weight
    with pytest.raises(ConfigError, match=r"rule 'test_wrong_shape' synthesized shape \(512,\), dtype torch\.float32 for tensor 'fc1\.weight' "
                                          r"of block 'blocks\.1', which needs shape \(32, 16\).*left unchanged"):
        replace_wrap.convert(model, every=2, rule="test_wrong_shape")
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert list(model.state_dict()) == list(before)


def test_convex_params_from_coefficients_projects():
    rule = get_rule("convex")
    alpha = rule.params_from_coefficients(torch.tensor([0.3, 2.0, -1.0]), torch.tensor([0.7, 0.0, 0.5]))["alpha"]
    a = torch.sigmoid(alpha)
    assert a[0].item() == pytest.approx(0.3, abs=1e-5)  # already convex: kept
    assert a[1].item() == pytest.approx(1 - 1e-4, abs=1e-6)  # beyond 1: clamped inside (0, 1)
    assert a[2].item() == pytest.approx(1e-4, abs=1e-6)
