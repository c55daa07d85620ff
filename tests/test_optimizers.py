"""Optimizers created before convert: rebound with convert(..., optimizers=opt)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import replace_wrap
from conftest import assert_same_state, state_snapshot
from toys import ResidualMLP


def _scalars(model):
    return [p for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite) for p in m.parameters()]


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_stale_optimizer_never_trains_the_scalars():
    # why rebinding exists: an optimizer built before convert keeps the removed tensors and misses a, b
    model = ResidualMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    replace_wrap.convert(model, every=2)
    before = [p.detach().clone() for p in _scalars(model)]
    _step(model, opt, ResidualMLP.example())
    assert all(torch.equal(b, p) for b, p in zip(before, _scalars(model)))


def test_rebound_optimizer_trains_like_one_created_after_convert():
    model = ResidualMLP()
    x = ResidualMLP.example()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    replace_wrap.convert(model, every=2, optimizers=opt)
    replace_wrap.convert(twin, every=2)
    fresh = torch.optim.SGD(twin.parameters(), lr=0.1)
    owned = {id(p) for p in model.parameters()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == owned
    for _ in range(3):
        _step(model, opt, x)
        _step(twin, fresh, x)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)
    assert not torch.equal(model.blocks[1].replacement.a, torch.tensor([0.5]))


def test_rebinding_drops_state_and_follows_param_groups():
    model = ResidualMLP()
    norms_and_biases = [p for n, p in model.named_parameters() if "norm" in n or n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if not ("norm" in n or n.endswith("bias"))]
    opt = torch.optim.AdamW(
        [{"params": weights, "weight_decay": 0.1}, {"params": norms_and_biases, "weight_decay": 0.0}], lr=1e-3
    )
    _step(model, opt, ResidualMLP.example())  # Adam state exists for every tensor
    removed = [model.blocks[1].fc1.weight, model.blocks[3].norm.weight]
    replace_wrap.convert(model, every=2, optimizers=[opt])
    held = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is r for p in held for r in removed)
    assert not any(p is r for p in opt.state for r in removed)
    # the scalars join the group of the block's first synthesized tensor (norm.weight: no weight decay)
    for i in (1, 3):
        site = model.blocks[i].replacement
        assert any(p is site.a for p in opt.param_groups[1]["params"])
        assert not any(p is site.a for p in opt.param_groups[0]["params"])
    _step(model, opt, ResidualMLP.example())
    assert not torch.equal(model.blocks[1].replacement.a.detach(), torch.tensor([0.5]))


def test_rebinding_keeps_param_names_and_skips_blocks_it_did_not_train():
    model = ResidualMLP()
    # trains blocks 0-2 only: block 3 is frozen out of this optimizer, so its scalars stay out too
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(("blocks.0.", "blocks.1.", "blocks.2."))]
    opt = torch.optim.SGD(named, lr=0.1)
    replace_wrap.convert(model, every=2, optimizers=opt)
    group = opt.param_groups[0]
    assert len(group["param_names"]) == len(group["params"])
    for name, p in zip(group["param_names"], group["params"]):
        assert model.get_parameter(name) is p
    assert "blocks.1.replacement.a" in group["param_names"]
    assert not any(n.startswith("blocks.3.") for n in group["param_names"])


def test_optimizer_errors_leave_the_model_unchanged():
    model = ResidualMLP()
    before = state_snapshot(model)
    head_only = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(replace_wrap.ConfigError, match=r"optimizers\[0\] \(SGD\) holds none of the tensors"):
        replace_wrap.convert(model, every=2, optimizers=head_only)
    with pytest.raises(replace_wrap.ConfigError, match=r"optimizers\[1\] is a dict, not a torch.optim.Optimizer"):
        replace_wrap.convert(model, every=2, optimizers=[torch.optim.SGD(model.parameters(), lr=0.1), {"lr": 1}])
    assert_same_state(before, state_snapshot(model))


@pytest.mark.parametrize("verb", ["merge", "revert"])
def test_merge_rebinds_the_optimizer_to_the_restored_tensors(verb):
    """merge(optimizers=) is the inverse of convert(optimizers=) (issue 11, defect 8): the scalars and their state
    leave the optimizer, the restored tensors join the groups that held the scalars, and the merged model
    trains exactly like one with a fresh optimizer built after the merge (SGD, no state)."""
    x = ResidualMLP.example()
    model = replace_wrap.convert(ResidualMLP(), every=2, keep_original=True)
    opt = torch.optim.SGD([
        {"params": [p for n, p in model.named_parameters() if "replacement" not in n], "lr": 0.1},
        {"params": [p for n, p in model.named_parameters() if "replacement" in n], "lr": 0.01},
    ], momentum=0.0)
    scalars = [p for n, p in model.named_parameters() if "replacement" in n]
    getattr(replace_wrap, verb)(model, optimizers=opt)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert not any(any(p is s for s in scalars) for p in held)
    assert {id(p) for p in model.parameters()} == {id(p) for p in held}
    restored = {id(model.blocks[i].get_parameter(n)) for i in (1, 3) for n, _ in model.blocks[i].named_parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == restored  # the group that held the scalars
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD([
        {"params": [p for n, p in twin.named_parameters() if not n.startswith(("blocks.1.", "blocks.3."))], "lr": 0.1},
        {"params": [p for n, p in twin.named_parameters() if n.startswith(("blocks.1.", "blocks.3."))], "lr": 0.01},
    ])
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)


@pytest.mark.parametrize("verb", ["convert", "merge"])
def test_a_rebound_optimizers_checkpoint_resumes_into_one_built_afterwards(verb):
    """The new tensors take their block's place in the group (found in the resume hunt): torch's
    Optimizer.load_state_dict matches states by position, and with them appended, the checkpoint of an
    Adam(model.parameters()) rebound by merge gave layer 2's moments to layer 1 and so on in a resumed Adam built
    from the merged model (a uniform stack: silently, 0.048 apart after 3 steps), and by convert failed inside
    torch (shapes). Oracle: the run that continued without the checkpoint."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    def build(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
        return replace_wrap.convert(net, every=2, ab_grad_sample="exact") if verb == "merge" else net

    model = build(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step(model, opt, x)
    if verb == "convert":  # an optimizer built and stepped before convert
        replace_wrap.convert(model, every=2, ab_grad_sample="exact", optimizers=opt)
    else:  # training on, plain, after merge
        replace_wrap.merge(model, optimizers=opt)
    _step(model, opt, x)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(2):
        _step(model, opt, x)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = build(1)
    if verb == "merge":
        replace_wrap.merge(resumed)  # the plain model: what the merged run's checkpoint is
    else:
        replace_wrap.convert(resumed, every=2, ab_grad_sample="exact")
    resumed.load_state_dict(checkpoint["model"])
    fresh = torch.optim.Adam(resumed.parameters(), lr=1e-2)  # built afterwards, as the docs advise
    fresh.load_state_dict(checkpoint["opt"])
    for _ in range(2):
        _step(resumed, fresh, x)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)


def test_merge_refuses_an_optimizer_that_holds_no_scalar():
    model = replace_wrap.convert(ResidualMLP(), every=2)
    other = torch.optim.SGD(ResidualMLP().parameters(), lr=0.1)
    snapshot = state_snapshot(model)
    with pytest.raises(replace_wrap.ConfigError, match="holds none of the scalars of the replaced blocks"):
        replace_wrap.merge(model, optimizers=other)
    assert_same_state(snapshot, state_snapshot(model))
