"""Checkpoints of converted models are also plain checkpoints: every plain loader gets the trained function.

The state dict of a converted model holds its scalars and, under the original keys, the replaced tensors'
synthesized values (replace_wrap.io.plain); loads into converted models drop those again (the guard).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import replace_wrap
from conftest import TOL, run_python
from toys import ConvNet, ResidualMLP, ResidualMLPBlock, SharedSubmoduleNet

MODELS = {"mlp": ResidualMLP, "conv_bn": ConvNet, "shared": SharedSubmoduleNet}


def _trained(factory, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _moved(replace_wrap.convert(factory(), **({"every": 2} | kw)), seed)


def _moved(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every parameter (scalars included) away from its initial value
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _out(model: torch.nn.Module, factory) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(factory.example())


def _scalar_keys(state) -> set[str]:
    return {k for k in state if ".replacement." in k}


@pytest.mark.parametrize("rule", ["linear", "convex", "ema"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_loads_into_the_plain_model_exactly(name, rule):
    factory = MODELS[name]
    model = _trained(factory, rule=rule)
    state = model.state_dict()
    plain = factory()
    assert set(plain.state_dict()) == set(state) - _scalar_keys(state)  # a plain state dict plus the scalars
    result = plain.load_state_dict(state, strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == _scalar_keys(state)
    torch.manual_seed(3)
    x = factory.example()
    with torch.no_grad():
        assert (plain.eval()(x) - model(x)).abs().max() <= TOL["merge"]
    # the one-call way: replace_wrap.load_state_dict drops the scalars, strict about everything else
    other = factory()
    assert not replace_wrap.load_state_dict(other, state).missing_keys
    with torch.no_grad():
        assert torch.equal(other.eval()(x), plain(x))
    # plain torch strict=True refuses loudly, naming the scalars
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*replacement\.a"):
        factory().load_state_dict(state)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_loads_drop_the_synthesized_values_and_restore_exactly(name):
    factory = MODELS[name]
    src, dst = _trained(factory, 0), _trained(factory, 5)
    result = dst.load_state_dict(src.state_dict())  # strict: nothing missing, nothing unexpected
    assert not result.missing_keys and not result.unexpected_keys
    sa, sb = src.state_dict(), dst.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(3)
    x = factory.example()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_synthesized_values_are_detached_and_do_not_move_a_stateful_rule():
    model = _trained(ResidualMLP, rule="ema").train()
    site = model.blocks[1].replacement
    shadows = {k: v.clone() for k, v in site.named_buffers()}
    seen = dict(site.__dict__.get("_rw_seen", {}))
    with torch.enable_grad():
        state = model.state_dict()
    assert not state["blocks.1.fc1.weight"].requires_grad
    assert all(torch.equal(v, shadows[k]) for k, v in site.named_buffers())
    assert site.__dict__.get("_rw_seen", {}) == seen
    # the value is the rule's: scale * shadow at the time of saving
    k = site.tensor_names.index("fc1.weight")
    torch.testing.assert_close(state["blocks.1.fc1.weight"], (site.scale * site.get_buffer(f"shadow_{k}")).detach())


def test_opt_out_keeps_the_converted_only_state_dict(tmp_path):
    model = _trained(ResidualMLP, plain_state_dict=False)
    keys = set(model.state_dict())
    assert not {k for k in keys if k.startswith(("blocks.1.", "blocks.3.")) and ".replacement." not in k}
    assert "blocks.1.replacement.a" in keys
    # recorded: a reload keeps the choice
    replace_wrap.save(model, tmp_path)
    again = replace_wrap.load(ResidualMLP(), tmp_path)
    assert "blocks.1.fc1.weight" not in again.state_dict()
    with pytest.raises(replace_wrap.ConfigError, match="plain_state_dict must be True or False"):
        replace_wrap.convert(ResidualMLP(), every=2, plain_state_dict="yes")


def test_cost_is_the_replaced_tensors_again():
    def nbytes(state) -> int:
        return sum(t.numel() * t.element_size() for t in state.values())

    original = nbytes(ResidualMLP().state_dict())
    plain_loadable = nbytes(_trained(ResidualMLP).state_dict())
    converted_only = nbytes(_trained(ResidualMLP, plain_state_dict=False).state_dict())
    scalars = 2 * 2 * 4  # two replaced blocks, a and b, fp32
    assert plain_loadable == original + scalars
    replaced = sum(p.numel() * 4 for i in (1, 3) for p in ResidualMLP().blocks[i].parameters())
    assert converted_only == original - replaced + scalars


def test_hook_leaves_with_merge_and_survives_copies():
    model = _trained(ResidualMLP)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "blocks.1.fc1.weight" in twin.state_dict()
        assert torch.equal(twin.state_dict()["blocks.1.fc1.weight"], model.state_dict()["blocks.1.fc1.weight"])
    synthesized = model.state_dict()["blocks.1.fc1.weight"]
    replace_wrap.merge(model)
    assert not any(m._state_dict_hooks for m in model.modules())
    state = model.state_dict()
    assert set(state) == set(ResidualMLP().state_dict()) and torch.equal(state["blocks.1.fc1.weight"], synthesized)


def test_differently_converted_and_plain_state_dicts_are_still_refused():
    state = _trained(ResidualMLP, every=None, policy=replace_wrap.Indices([2])).state_dict()
    with pytest.raises(replace_wrap.StateDictError, match="converted differently"):
        _trained(ResidualMLP).load_state_dict(state)
    with pytest.raises(replace_wrap.StateDictError, match="and no scalars"):
        _trained(ResidualMLP).load_state_dict(ResidualMLP().state_dict())


def test_sharded_state_dict_stays_converted_only():
    # FSDP2 on one process: the scalars are DTensors, so the hook writes nothing (DCP saves converted-only)
    code = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, "tests")
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
from torch.distributed.device_mesh import init_device_mesh
import replace_wrap
from toys import ResidualMLP
model = replace_wrap.shard(replace_wrap.convert(ResidualMLP(), every=2), mesh=init_device_mesh("cpu", (1,)))
keys = list(model.state_dict())
print("SYNTH" if "blocks.1.fc1.weight" in keys else "NOSYNTH", "SCALARS" if "blocks.1.replacement.a" in keys else "")
dist.destroy_process_group()
"""
    proc = run_python("-c", code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NOSYNTH SCALARS" in proc.stdout


def test_checkpoint_sizes_example():
    pytest.importorskip("transformers")
    from conftest import load_example

    example = load_example("checkpoint_sizes")
    for row in example.main(["--small"]):
        # the plain-loadable checkpoint is the original one plus a few scalars; the converted-only one smaller
        assert abs(row["plain"] - row["original"]) < 0.01 and row["converted_only"] < 0.9 * row["original"]


def test_saving_in_training_mode_never_moves_a_stateful_rule():
    """The state_dict hook reads the ema shadow as it is (state_frozen), even right after an optimizer step."""
    from toys import ResidualMLP

    model = replace_wrap.convert(ResidualMLP(), every=2, rule="ema")
    x = ResidualMLP.example()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()  # the target moved: a training-mode read now would advance the shadow
    shadows = {k: v.clone() for k, v in model.state_dict().items() if ".shadow_" in k}
    model.state_dict()  # again: nothing moved
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shadows.items())


# --- torch's activation checkpointing wrappers --------------------------------------------------------------
# checkpoint_wrapper holds a module as "<path>._checkpoint_wrapped_module", and its state-dict hooks drop that
# segment from every key (and add it back on load). Applied by apply_activation_checkpointing, as Accelerate's
# FSDP recipes and torchtitan do: around whole blocks, or around layers (then inside the replaced blocks), before
# or after convert.
WRAPPINGS = {  # name -> (the modules wrapped, wrapped before convert)
    "blocks_before": (ResidualMLPBlock, True),
    "blocks_after": (ResidualMLPBlock, False),
    "layers_before": (torch.nn.Linear, True),
    "layers_after": (torch.nn.Linear, False),
}


def _wrap(model: torch.nn.Module, kind: type) -> torch.nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, kind))
    return model


def _wrapped(way: str, seed: int = 0, wrap: bool = True) -> torch.nn.Module:
    """A converted, moved ResidualMLP wrapped as ``way`` says (``wrap=False``: the same model, not wrapped)."""
    kind, before = WRAPPINGS[way]
    torch.manual_seed(seed)
    model = ResidualMLP()
    if wrap and before:
        _wrap(model, kind)
    replace_wrap.convert(model, every=2)
    if wrap and not before:
        _wrap(model, kind)
    return _moved(model, seed)


def _n_wrappers(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules())


@pytest.mark.parametrize("way", sorted(WRAPPINGS))
def test_checkpoint_wrapped_state_dict_is_the_plain_models(way):
    model = _wrapped(way)
    state = model.state_dict()
    plain_state = {k: v for k, v in state.items() if k not in _scalar_keys(state)}
    # the keys torch writes: no wrapper segment, the replaced tensors under their original keys
    assert set(plain_state) == set(ResidualMLP().state_dict())
    x = ResidualMLP.example()
    with torch.no_grad():
        want = model(x)
        for plain in (ResidualMLP(), _wrap(ResidualMLP(), WRAPPINGS[way][0])):
            plain.load_state_dict(plain_state)  # strict
            assert (plain.eval()(x) - want).abs().max() <= TOL["merge"]
        # a copy keeps its wrappers (a replaced layer's own __deepcopy__, reached through the wrapper's
        # attribute forwarding, returned the layer alone), and merges into the same function
        twin = copy.deepcopy(model)
        assert _n_wrappers(twin) == _n_wrappers(model) > 0
        merged = replace_wrap.merge(twin)
        assert (merged(x) - want).abs().max() <= TOL["merge"]
        assert set(merged.state_dict()) == set(plain_state)
        # converted with and without the wrappers: each loads the other's state dict strictly, exactly
        for dst, src in ((_wrapped(way, seed=4, wrap=False), model), (_wrapped(way, seed=4), _wrapped(way, wrap=False))):
            assert not dst.load_state_dict(src.state_dict()).unexpected_keys
            assert torch.equal(dst(x), want)


@pytest.mark.parametrize("way", sorted(WRAPPINGS))
def test_checkpoint_wrapped_model_trains_as_the_unwrapped_one(way):
    models = [_wrapped(way).train(), _wrapped(way, wrap=False).train()]
    x = ResidualMLP.example()
    grads = []
    for m in models:
        torch.manual_seed(7)  # the same sampled rows in both
        m(x).square().mean().backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in m.named_parameters()})
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    scalars = [n for n in grads[0] if ".replacement." in n]
    assert len(scalars) == 4 and all(grads[0][n].abs().sum() > 0 for n in scalars)
    with torch.no_grad():
        assert torch.equal(models[0].eval()(x), models[1].eval()(x))
    # the report reads the live scalars wherever the wrapper put the block
    live = [b.scalars for b in replace_wrap.report(models[0]).replaced]
    assert live == [b.scalars for b in replace_wrap.report(models[1]).replaced]
    assert live[0]["a"] != [0.5]


@pytest.mark.parametrize("way", sorted(WRAPPINGS))
def test_plain_state_dict_into_a_checkpoint_wrapped_model_is_refused_as_unwrapped(way):
    model = _wrapped(way)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for plain in (ResidualMLP(), _wrap(ResidualMLP(), WRAPPINGS[way][0])):
        with pytest.raises(replace_wrap.StateDictError) as wrapped:
            model.load_state_dict(plain.state_dict())
        with pytest.raises(replace_wrap.StateDictError) as bare:
            _wrapped(way, wrap=False).load_state_dict(plain.state_dict())
        assert str(wrapped.value) == str(bare.value) and "and no scalars" in str(wrapped.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("way", sorted(WRAPPINGS))
def test_checkpoint_wrapped_save_loads_into_the_model_wrapped_or_not(way, tmp_path):
    model = _wrapped(way)
    replace_wrap.save(model, tmp_path)
    # the record names blocks by their state-dict keys, as the weights beside it do
    assert [b.path for b in replace_wrap.ConversionRecord.of(model).blocks] == ["blocks.1", "blocks.3"]
    x = ResidualMLP.example()
    with torch.no_grad():
        want = model(x)
        for kind in (None, ResidualMLPBlock, torch.nn.Linear):
            fresh = ResidualMLP() if kind is None else _wrap(ResidualMLP(), kind)
            twin = replace_wrap.load(fresh, tmp_path).eval()
            assert torch.equal(twin(x), want)


def test_a_checkpoint_wrapped_converted_model_is_recorded_as_the_model_it_holds(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    inner = _trained(ResidualMLP)
    model = checkpoint_wrapper(inner)
    record = replace_wrap.ConversionRecord.of(model)
    assert record.module == "ResidualMLP" and [b.path for b in record.blocks] == ["blocks.1", "blocks.3"]
    replace_wrap.save(model, tmp_path)
    x = ResidualMLP.example()
    with torch.no_grad():
        for fresh in (ResidualMLP(), checkpoint_wrapper(ResidualMLP())):
            assert torch.equal(replace_wrap.load(fresh, tmp_path).eval()(x), inner(x))
        with pytest.raises(replace_wrap.StateDictError, match="and no scalars"):
            model.load_state_dict(ResidualMLP().state_dict())


@pytest.mark.parametrize("way", sorted(WRAPPINGS))
def test_checkpoint_wrapped_models_verify_synthesized_values_on_load(way):
    # the synthesized values are checked under the keys torch writes: a wrapped model's own round trip is
    # accepted (every value compared), an edited value refused before anything is copied
    from replace_wrap.io import verify

    model = _wrapped(way)
    state = model.state_dict()
    compared: list[str] = []
    original = verify._Reader.forward

    def spy(self):
        compared.extend(job.key for job in self.jobs)
        return original(self)

    x = ResidualMLP.example()
    dst = _wrapped(way, seed=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify._Reader, "forward", spy)
        dst.load_state_dict(state)
    synthesized = [k for k in state if k.startswith(("blocks.1.", "blocks.3.")) and ".replacement." not in k]
    assert sorted(compared) == sorted(synthesized) and compared
    from replace_wrap.io.plain import synthesized_paths  # what from_pretrained's check reads: the same keys

    assert sorted(synthesized_paths(model)) == sorted(synthesized)
    with torch.no_grad():
        assert torch.equal(dst(x), model(x))
    edited = dict(state)
    edited["blocks.3.fc2.weight"] = state["blocks.3.fc2.weight"] + 1e-2
    target = _wrapped(way, seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(replace_wrap.SynthesisMismatchError) as err:
        target.load_state_dict(edited)
    assert err.value.key == "blocks.3.fc2.weight" and "blocks.2.fc2.weight" in str(err.value)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
