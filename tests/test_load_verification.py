"""Loading a checkpoint's synthesized values: compared with what its own neighbours and scalars synthesize.

A plain state dict of a converted model holds each replaced tensor's value next to what defines it. A converted
model that loads it must end up computing those values; where its rule would give others (saved by a model that
synthesizes differently, or edited), the load is refused before anything is copied (replace_wrap.io.verify).
The oracles here are independent of the check: the saved model's own outputs, and hand-edited tensors.
"""

from __future__ import annotations

import logging

import pytest
import torch

import replace_wrap
from conftest import assert_same_state, run_python, state_snapshot
from replace_wrap.io import verify
from replace_wrap.synthesis.rules import LinearRule, register_rule
from toys import ConvNet, ResidualMLP, StagedCNN

MODELS = {"mlp": ResidualMLP, "conv_bn": ConvNet, "staged": StagedCNN}  # staged: shape-adapted neighbours


def _trained(factory, seed: int = 0, steps: int = 2, **kw) -> torch.nn.Module:
    """A converted model after a few optimizer steps (scalars and neighbours moved by training)."""
    torch.manual_seed(seed)
    model = replace_wrap.convert(factory(), **({"every": 2} | kw))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(factory.example()).square().mean().backward()
        opt.step()
    return model.eval()


def _fresh(factory, seed: int = 7, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return replace_wrap.convert(factory(), **({"every": 2} | kw)).eval()


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture
def compared(monkeypatch):
    """The keys whose synthesized values the check compared, in order (proof that it ran)."""
    keys: list[str] = []
    original = verify._Reader.forward

    def forward(self):
        keys.extend(job.key for job in self.jobs)
        return original(self)

    monkeypatch.setattr(verify._Reader, "forward", forward)
    return keys


def _synthesized(model: torch.nn.Module) -> list[str]:
    from replace_wrap.io.plain import synthesized_paths

    return list(synthesized_paths(model))


# --- legitimate round trips: checked, accepted, the same model ----------------------------------------------


@pytest.mark.parametrize("options", [{}, {"rule": "convex", "scalars": "tensor"}, {"rule": "ema"},
                                     {"keep_original": True}, {"neighbour_grad": "coupled"}],
                         ids=["linear", "convex-tensor", "ema", "keep-original", "coupled"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_round_trip_is_checked_and_loads_the_same_model(name, options, compared):
    factory = MODELS[name]
    src = _trained(factory, **options)
    dst = _fresh(factory, **options)
    assert not dst.load_state_dict(src.state_dict()).missing_keys
    assert compared == _synthesized(src)  # every replaced tensor was compared
    x = factory.example()
    assert torch.equal(_out(dst, x), _out(src, x))


@pytest.mark.parametrize("saved, loaded", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
], ids=["bf16", "fp16", "bf16-into-fp32", "fp32-into-bf16", "fp32-into-fp16"])
def test_low_precision_checkpoints_and_casts_after_saving_are_accepted(saved, loaded, compared):
    src = _trained(ResidualMLP, steps=3).to(saved)
    state = src.state_dict()
    dst = _fresh(ResidualMLP).to(loaded)
    dst.load_state_dict(state)
    assert compared == _synthesized(src)
    synthesized = set(_synthesized(src))
    for k, v in dst.state_dict().items():  # loaded: the checkpoint's tensors, cast to the model's dtypes
        if k not in synthesized:
            assert torch.equal(v, state[k].to(v.dtype)), k


def test_tiny_values_cast_to_fp16_subnormals_are_accepted(compared):
    # LayerScale gammas start at 1e-6 (timm's ConvNeXt, CaiT): fp16 holds them as subnormals, spaced 6e-8 apart
    # whatever their size, so a cast rounds them by far more than 8 eps of themselves (convnext_atto's fp32
    # checkpoint into model.half() was refused: "differs by up to 2.26e-08 (allowed 2.03e-08)")
    src = _trained(ResidualMLP)
    with torch.no_grad():
        for name, p in src.named_parameters():  # the neighbours' (the replaced blocks' are synthesized)
            if name.endswith("norm.weight"):
                p.mul_(1e-6)
    dst = _fresh(ResidualMLP).half()
    dst.load_state_dict(src.state_dict())
    assert compared == _synthesized(src)


def test_a_checkpoint_loaded_in_a_fresh_process_is_accepted(tmp_path):
    src = _trained(ResidualMLP, rule="ema")
    replace_wrap.save(src, tmp_path)
    x = ResidualMLP.example()
    torch.save({"x": x, "y": _out(src, x)}, tmp_path / "io.pt")
    code = f"""
import sys, torch
sys.path.insert(0, "tests")
import replace_wrap
from toys import ResidualMLP
model = replace_wrap.load(ResidualMLP(), {str(tmp_path)!r}).eval()
ref = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    print(torch.equal(model(ref["x"]), ref["y"]))
"""
    proc = run_python("-c", code, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True"]


# --- refused: tampered values, edited neighbours or scalars, another rule -----------------------------------


def _edits(state: dict) -> dict[str, tuple[str, dict]]:
    """Checkpoints edited after saving: (the key the refusal names, the edited state dict)."""
    def edit(key: str, f) -> dict:
        out = dict(state)
        out[key] = f(out[key])
        return out

    return {
        "synthesized": ("blocks.1.fc1.weight", edit("blocks.1.fc1.weight", lambda t: t + 1e-3)),
        "neighbour": ("blocks.3.fc2.weight", edit("blocks.4.fc2.weight", lambda t: t * 1.01)),
        "scalar": ("blocks.3.", edit("blocks.3.replacement.a", lambda t: t + 0.01)),  # its first tensor
    }


@pytest.mark.parametrize("what", ["synthesized", "neighbour", "scalar"])
def test_an_edited_checkpoint_is_refused_before_copying_and_names_the_key(what):
    state = _trained(ResidualMLP).state_dict()
    key, edited = _edits(state)[what]
    model = _trained(ResidualMLP, seed=3)
    x = ResidualMLP.example()
    y, before = _out(model, x), state_snapshot(model)
    with pytest.raises(replace_wrap.SynthesisMismatchError) as err:
        model.load_state_dict(edited)  # the plain torch call: the guard answers
    e = err.value
    assert isinstance(e, replace_wrap.StateDictError) and e.key.startswith(key) and e.max_diff > e.tolerance > 0
    msg = str(e)
    assert f"under {e.key!r} a synthesized value that differs by up to" in msg and "Nothing was loaded" in msg
    assert "replace_wrap.load_state_dict(model, state_dict, strict=False)" in msg
    assert_same_state(before, state_snapshot(model))
    assert torch.equal(_out(model, x), y)


def test_a_nan_in_a_synthesized_value_alone_is_refused_and_in_both_is_accepted():
    src = _trained(ResidualMLP)
    state = src.state_dict()
    bad = dict(state)
    bad["blocks.1.fc1.weight"] = bad["blocks.1.fc1.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    with pytest.raises(replace_wrap.SynthesisMismatchError, match=r"differs by up to inf"):
        _fresh(ResidualMLP).load_state_dict(bad)
    with torch.no_grad():  # a diverged run: the neighbour is NaN, so is what it synthesizes; a faithful checkpoint
        src.blocks[0].fc1.weight[0, 0] = float("nan")
    _fresh(ResidualMLP).load_state_dict(src.state_dict())


def test_a_synthesized_value_of_another_shape_is_refused():
    state = _trained(ResidualMLP).state_dict()
    state["blocks.3.fc1.weight"] = state["blocks.3.fc1.weight"][:-1]  # another adaptation: another shape
    with pytest.raises(replace_wrap.SynthesisMismatchError, match=r"under 'blocks\.3\.fc1\.weight' a synthesized "
                       r"value that has shape \(\d+, \d+\), not the shape \(\d+, \d+\) this model synthesizes"):
        _fresh(ResidualMLP).load_state_dict(state)


@register_rule("test_verify_doubled")
class _Doubled(LinearRule):
    """The linear rule's parameters (same keys, same shapes), another synthesis: 2 * (a * prev + b * next)."""

    def synthesize(self, site, index, prev, next):
        return 2 * super().synthesize(site, index, prev, next)


def test_a_checkpoint_of_another_rule_with_the_same_keys_is_refused():
    # the case no key check can see: the names and shapes agree, the values the rule makes do not
    src = _trained(ResidualMLP, rule="test_verify_doubled")
    model = _trained(ResidualMLP, seed=3)
    assert set(src.state_dict()) == set(model.state_dict())
    before = state_snapshot(model)
    with pytest.raises(replace_wrap.SynthesisMismatchError, match=r"under 'blocks\.1\..*more replaced tensors differ"):
        model.load_state_dict(src.state_dict())
    assert_same_state(before, state_snapshot(model))
    _fresh(ResidualMLP, rule="test_verify_doubled").load_state_dict(src.state_dict())  # converted the same way


def test_replace_wrap_load_and_prefixed_state_dicts_are_refused_too(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _trained(ResidualMLP)
    replace_wrap.save(src, tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    state["blocks.2.fc1.weight"] = state["blocks.2.fc1.weight"] * 0.9  # a neighbour edited, its mix left as saved
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(replace_wrap.SynthesisMismatchError, match=r"under 'blocks\.1\.fc1\.weight'"):
        replace_wrap.load(ResidualMLP(), tmp_path)
    # under a prefix (DDP's module.): the converted module's guard checks its own keys
    wrapper = torch.nn.ModuleDict({"module": _trained(ResidualMLP, seed=3)})
    before = state_snapshot(wrapper)
    with pytest.raises(replace_wrap.SynthesisMismatchError, match=r"under 'module\.blocks\.1\.fc1\.weight'"):
        wrapper.load_state_dict({f"module.{k}": v for k, v in state.items()})
    assert_same_state(before, state_snapshot(wrapper))


def test_strict_false_is_the_way_past_and_partial_dicts_are_not_checked(compared):
    state = _trained(ResidualMLP).state_dict()
    _, edited = _edits(state)["neighbour"]
    model = _fresh(ResidualMLP)
    replace_wrap.load_state_dict(model, edited, strict=False)  # on purpose: the scalars and neighbours as they are
    assert not compared
    assert torch.equal(model.blocks[4].fc2.weight, edited["blocks.4.fc2.weight"])
    # partial dicts without synthesized values: nothing to compare, they load as before
    trainable = {k: v for k, v in _trained(ResidualMLP, seed=4).state_dict().items() if ".replacement." in k
                 or k.startswith("blocks.0.")}
    model.load_state_dict(trainable, strict=False)
    assert torch.equal(model.blocks[0].fc1.weight, trainable["blocks.0.fc1.weight"]) and not compared
    converted_only = _trained(ResidualMLP, plain_state_dict=False).state_dict()
    _fresh(ResidualMLP, plain_state_dict=False).load_state_dict(converted_only)
    assert not compared


def test_meta_models_are_checked_with_assign_and_skipped_without(caplog):
    # (each load gets its own state dict: torch records assign=True in the dict's _metadata it is handed)
    src = _trained(ResidualMLP)
    with torch.device("meta"):
        model = replace_wrap.convert(ResidualMLP(), every=2)
    model.load_state_dict(src.state_dict(), assign=True)  # the incoming tensors are the model: checked
    x = ResidualMLP.example()
    assert torch.equal(_out(model.eval(), x), _out(src, x))
    with torch.device("meta"):
        model = replace_wrap.convert(ResidualMLP(), every=2)
    with pytest.raises(replace_wrap.SynthesisMismatchError):
        model.load_state_dict(_edits(src.state_dict())["synthesized"][1], assign=True)
    with caplog.at_level(logging.INFO, logger="replace_wrap"), pytest.warns(UserWarning, match="no-op"):
        model.load_state_dict(src.state_dict())  # into meta tensors: torch copies nothing, nothing to compare
    assert "were not checked" in caplog.text and "meta tensor" in caplog.text


# --- Hugging Face: from_pretrained and the Trainer's sharded checkpoints --------------------------------------


def test_hf_from_pretrained_checks_the_values_it_ignores(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file
    from toys import tiny_hf_vit

    torch.manual_seed(0)
    model = replace_wrap.convert(tiny_hf_vit(), every=2)
    with torch.no_grad():
        model.vit.layers[1].replacement.a.fill_(0.3)
    model.save_pretrained(tmp_path / "one")
    twin = replace_wrap.from_pretrained(transformers.ViTForImageClassification, tmp_path / "one")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(twin.eval()(pixel_values=x).logits, model.eval()(pixel_values=x).logits)
    weights = tmp_path / "one" / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if "layer.1." in k and k.endswith("query.weight"))  # the checkpoint's own name
    state[key] = state[key] * 1.5
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(replace_wrap.SynthesisMismatchError, match=r"'vit\.layers\.1\.attention\.q_proj\.weight'.*"
                       r"no model was returned"):
        replace_wrap.from_pretrained(transformers.ViTForImageClassification, tmp_path / "one")
    # into its base model (AutoModel), Hugging Face drops base_model_prefix ("vit.") from the checkpoint's keys:
    # the check read the model's own keys from the file, found none, and compared nothing
    with pytest.raises(replace_wrap.SynthesisMismatchError, match=r"'layers\.1\.attention\.q_proj\.weight'"):
        replace_wrap.from_pretrained(transformers.ViTModel, tmp_path / "one")



def test_hf_from_pretrained_says_which_values_it_could_not_compare(tmp_path, caplog):
    # transformers 5 fuses Mixtral's per-expert checkpoint tensors into one model tensor (experts.gate_up_proj):
    # no file name maps to it alone, so it is not compared; that was silent
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                     num_experts_per_tok=1)
    replace_wrap.convert(transformers.MixtralForCausalLM(cfg), every=2).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="replace_wrap"):
        replace_wrap.from_pretrained(transformers.MixtralForCausalLM, tmp_path)
    assert "were not checked" in caplog.text and "mlp.experts." in caplog.text


def _llama(seed: int) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    return replace_wrap.convert(transformers.LlamaForCausalLM(cfg), every=2).eval()


def test_hf_trainer_sharded_checkpoints_are_checked_before_any_shard_loads(tmp_path):
    # the Trainer's loader (load_state_dict per shard, strict=False): checked on the whole checkpoint first
    trainer_module = pytest.importorskip("transformers.trainer")
    import json

    from safetensors.torch import load_file, save_file

    model = _llama(0)
    with torch.no_grad():
        model.model.layers[1].replacement.a.fill_(0.3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    twin = _llama(1)
    trainer_module.load_sharded_checkpoint(twin, tmp_path, strict=False)
    ids = torch.tensor([[5, 9, 4, 7]])
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.3.mlp.up_proj.weight"
    shard = tmp_path / weight_map[key]
    state = load_file(str(shard))
    state[key] = state[key] + 0.01
    save_file(state, str(shard), metadata={"format": "pt"})
    other = _llama(2)
    before = state_snapshot(other)
    with pytest.raises(replace_wrap.SynthesisMismatchError, match=rf"under '{key}'.*no shard was loaded"):
        trainer_module.load_sharded_checkpoint(other, tmp_path, strict=False)
    assert_same_state(before, state_snapshot(other))
