"""Saving and loading converted models: state dicts, the guard, save/load directories, HF save_pretrained."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import replace_wrap
from conftest import assert_same_state, state_snapshot
from replace_wrap.io.record import CONFIG_KEY, RECORD_FILE, ConversionRecord
from toys import ConvNet, ResidualMLP, SharedSubmoduleNet


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every parameter (scalars included) away from its initial value, so round trips prove something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _converted(factory, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return _perturbed(replace_wrap.convert(factory(), **({"every": 2} | kw)), seed + 1)


def _assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


MODELS = {
    "mlp": (ResidualMLP, ResidualMLP.example),
    "conv_bn": (ConvNet, ConvNet.example),  # BatchNorm buffers of replaced blocks stay the block's own
    "shared": (SharedSubmoduleNet, SharedSubmoduleNet.example),  # state_dict entries share memory
}


# --- state_dict --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_loads_into_fresh_conversion_bit_identically(name):
    factory, example = MODELS[name]
    src = _converted(factory, seed=0)
    dst = _converted(factory, seed=5)  # other weights, other scalars
    dst.load_state_dict(src.state_dict())
    _assert_bit_identical(src, dst)
    src.eval(), dst.eval()
    x = example()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_torch_save_and_weights_only_load():
    src = _converted(ResidualMLP, every=2, rule="convex", scalars="tensor")
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    dst = replace_wrap.convert(ResidualMLP(), every=2, rule="convex", scalars="tensor")
    dst.load_state_dict(state)
    _assert_bit_identical(src, dst)


def test_converted_state_dict_into_unconverted_model_names_the_blocks_to_convert():
    # a converted-only state dict (plain_state_dict=False): no replaced tensors, so no plain model to load
    state = _converted(ResidualMLP, plain_state_dict=False).state_dict()
    plain = ResidualMLP()
    before = state_snapshot(plain)
    with pytest.raises(replace_wrap.StateDictError) as err:
        replace_wrap.load_state_dict(plain, state)
    msg = str(err.value)
    assert "saved from a converted model" in msg and "not converted" in msg and "'blocks.1.norm.weight'" in msg
    assert "replace_wrap.Paths(['blocks.1', 'blocks.3'])" in msg
    assert_same_state(before, state_snapshot(plain))
    # following the message works
    replace_wrap.convert(plain, policy=replace_wrap.Paths(["blocks.1", "blocks.3"]))
    replace_wrap.load_state_dict(plain, state)
    assert torch.equal(plain.blocks[1].replacement.a, state["blocks.1.replacement.a"])


def test_load_state_dict_function_is_plain_load_otherwise():
    src, dst = ResidualMLP(), ResidualMLP()
    result = replace_wrap.load_state_dict(dst, src.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    _assert_bit_identical(src, dst)


def test_unconverted_state_dict_into_converted_model_is_refused_before_copying():
    model = _converted(ResidualMLP)
    before = state_snapshot(model)
    with pytest.raises(replace_wrap.StateDictError) as err:
        model.load_state_dict(ResidualMLP().state_dict())  # the plain torch call: convert's guard answers
    msg = str(err.value)
    assert "unconverted or merged model" in msg and "replaced blocks ['blocks.1', 'blocks.3']" in msg
    assert "Load it before converting" in msg
    assert_same_state(before, state_snapshot(model))  # nothing was copied


def test_differently_converted_state_dict_is_refused():
    state = _converted(ResidualMLP, every=None, policy=replace_wrap.Indices([2])).state_dict()
    model = _converted(ResidualMLP)
    expected = r"converted differently: it replaced blocks \['blocks.2'\]"
    with pytest.raises(replace_wrap.StateDictError, match=expected):
        model.load_state_dict(state)


@pytest.mark.parametrize("plain_state_dict", [True, False])
@pytest.mark.parametrize("saved, loaded, theirs", [
    ({"scalars": "tensor"}, {}, "a[6], b[6]"),
    ({}, {"scalars": "tensor"}, "a[1], b[1]"),
    ({"rule": "convex"}, {}, "alpha[1]"),
    ({}, {"rule": "ema"}, "a[1], b[1]"),
    ({"keep_original": True}, {}, "original_0[16]"),
], ids=["tensor-into-block", "block-into-tensor", "convex-into-linear", "linear-into-ema", "originals"])
def test_same_blocks_other_options_is_refused_before_copying(saved, loaded, theirs, plain_state_dict):
    # torch copied every other tensor, then raised its own size-mismatch / missing-key error: half-loaded
    state = _converted(ResidualMLP, seed=1, plain_state_dict=plain_state_dict, **saved).state_dict()
    model = _converted(ResidualMLP, plain_state_dict=plain_state_dict, **loaded)
    before = state_snapshot(model)
    x = ResidualMLP.example()
    y = model(x)
    with pytest.raises(replace_wrap.StateDictError) as err:
        model.load_state_dict(state)
    msg = str(err.value)
    assert "converted with other options" in msg and theirs in msg and "'blocks.1.replacement'" in msg
    assert "Nothing was loaded" in msg and "replace_wrap.load" in msg
    assert_same_state(before, state_snapshot(model))  # nothing was copied
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"keep_original": True}, {"rule": "ema"}], ids=["originals", "ema"])
def test_trainable_only_state_dict_loads_with_strict_false(options):
    # the scalars without the site's buffers (originals, ema shadows). With a frozen tensor missing too, the dict
    # is told partial by its keys: it loads with torch's strict=False, the buffers it lacks are missing keys.
    # Lacking only the sites' buffers, it is also what a checkpoint converted without them looks like (another
    # keep_original=, which torch would half-load before raising): refused, naming replace_wrap.load_state_dict.
    x = ResidualMLP.example()
    src = _converted(ResidualMLP, seed=1, **options).eval()
    for frozen in (True, False):
        src.proj.requires_grad_(not frozen)
        trainable = {k: v.detach().clone() for k, v in src.named_parameters() if v.requires_grad}
        model = _converted(ResidualMLP, seed=1, **options).eval()
        with torch.no_grad():
            model.proj.weight.copy_(src.proj.weight)  # what a frozen tensor is: the same in both
            for site in (model.blocks[1].replacement, model.blocks[3].replacement):
                site.a.fill_(0.2)
        if frozen:
            result = model.load_state_dict(trainable, strict=False)
        else:
            before = {k: v.clone() for k, v in model.named_parameters()}
            with pytest.raises(replace_wrap.StateDictError, match=r"converted with other options.* A partial state "
                               r"dict .* replace_wrap\.load_state_dict\(model, state_dict, strict=False\)"):
                model.load_state_dict(trainable, strict=False)
            assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # nothing was loaded
            result = replace_wrap.load_state_dict(model, trainable, strict=False)
        assert result.unexpected_keys == [] and result.missing_keys
        lacking = [k for k in result.missing_keys if not (frozen and k.startswith("proj."))]
        assert lacking and all(".replacement." in k and not k.endswith((".a", ".b", ".scale")) for k in lacking)
        with torch.no_grad():
            torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
    partial = {k: v for k, v in trainable.items() if not k.endswith(".b")}  # a parameter missing: still refused
    with pytest.raises(replace_wrap.StateDictError, match="converted with other options"):
        model.load_state_dict(partial, strict=False)


def test_a_converted_only_checkpoint_of_another_keep_original_is_refused_before_copying():
    # plain_state_dict=False, keep_original=False, loaded into a keep_original=True model: every key of the model
    # but the originals; torch copied 10 of 14 tensors, then raised about the missing originals
    src = _converted(ResidualMLP, seed=1, plain_state_dict=False)
    state = src.state_dict()
    model = _converted(ResidualMLP, seed=2, keep_original=True, plain_state_dict=False)
    before = {k: v.clone() for k, v in model.named_parameters()}
    with pytest.raises(replace_wrap.StateDictError, match="converted with other options"):
        model.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_guard_strict_false_and_prefixes():
    model = _converted(ResidualMLP)
    plain_state = ResidualMLP().state_dict()
    # torch hands strict=True to every pre-hook, so a plain strict=False load is refused too ...
    with pytest.raises(replace_wrap.StateDictError, match="strict=False"):
        model.load_state_dict(plain_state, strict=False)
    # ... and replace_wrap.load_state_dict(strict=False) drops the replaced blocks' tensors on purpose
    result = replace_wrap.load_state_dict(model, plain_state, strict=False)
    assert "blocks.1.replacement.a" in result.missing_keys and "blocks.1.fc1.weight" in result.unexpected_keys
    assert torch.equal(model.blocks[0].fc1.weight, plain_state["blocks.0.fc1.weight"])
    # a partial state dict that does not touch replaced blocks passes the guard
    model.load_state_dict({"head.bias": torch.zeros(4)}, strict=False)
    wrapper = torch.nn.ModuleDict({"module": _converted(ResidualMLP)})  # like DDP's "module." prefix
    wrapper.load_state_dict({f"module.{k}": v for k, v in model.state_dict().items()})
    with pytest.raises(replace_wrap.StateDictError):
        wrapper.load_state_dict({f"module.{k}": v for k, v in plain_state.items()})


def test_guard_survives_copies_and_leaves_with_merge():
    model = _converted(ResidualMLP)
    plain_state = ResidualMLP().state_dict()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.raises(replace_wrap.StateDictError):
            twin.load_state_dict(plain_state)
    replace_wrap.merge(model)
    assert not model._load_state_dict_pre_hooks
    model.load_state_dict(plain_state)  # a merged model is a plain model


# --- save / load directories ---------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("name", ["mlp", "shared"])
def test_save_load_round_trip(tmp_path, name, safe):
    factory, example = MODELS[name]
    options = {"rule": "convex", "scalars": "tensor", "neighbour_grad": "coupled"}
    src = _converted(factory, **options)
    replace_wrap.save(src, tmp_path, safe_serialization=safe)
    assert (tmp_path / RECORD_FILE).is_file()
    dst = replace_wrap.load(factory(), tmp_path)
    _assert_bit_identical(src, dst)
    assert replace_wrap.report(dst).config == replace_wrap.report(src).config
    src.eval(), dst.eval()
    x = example()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("wrap", [
    lambda m: torch.compile(m, backend="eager"),
    torch.nn.DataParallel,  # DistributedDataParallel (also unwrapped) needs a process group
], ids=["torch.compile", "DataParallel"])
def test_save_of_a_wrapped_model_is_the_models_checkpoint(tmp_path, wrap):
    # save(torch.compile(model)) recorded the blocks as '_orig_mod.blocks.1' and wrote '_orig_mod.'-prefixed
    # weights: load(fresh model) refused ("are no blocks of any stack"), and no plain loader took the weights
    from safetensors.torch import load_file

    src = _converted(ResidualMLP)
    replace_wrap.save(wrap(src), tmp_path)
    assert [b["path"] for b in json.loads((tmp_path / RECORD_FILE).read_text())["blocks"]] == ["blocks.1", "blocks.3"]
    assert list(load_file(str(tmp_path / "model.safetensors"))) == sorted(src.state_dict())
    _assert_bit_identical(src, replace_wrap.load(ResidualMLP(), tmp_path))
    fresh = ResidualMLP()
    assert replace_wrap.load(wrapped := wrap(fresh), tmp_path) is wrapped  # a wrapped model loads its inner one
    _assert_bit_identical(src, fresh)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_a_neighbour_parametrized_after_convert_saves_and_loads_into_a_model_parametrized_before(tmp_path, kind):
    # load converts a model built (and parametrized) afresh: its neighbour's weight is no parameter but a
    # parametrized property. It counts as the counterpart it was when converted, not as an absent side (which
    # loaded silently as another model: the next side's contribution replaced by zeros).
    parametrize = getattr(torch.nn.utils.parametrizations, kind)
    torch.manual_seed(0)
    src = replace_wrap.convert(ResidualMLP(), every=2)
    parametrize(src.blocks[2].fc1)
    x = ResidualMLP.example()
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    src(x).pow(2).sum().backward()
    opt.step()
    src.eval()
    replace_wrap.save(src, tmp_path)
    fresh = ResidualMLP()
    parametrize(fresh.blocks[2].fc1)
    fresh.train()
    before = state_snapshot(fresh)
    replace_wrap.plan(fresh, policy=replace_wrap.Every(2))  # reads the parametrized weight without changing
    assert_same_state(before, state_snapshot(fresh))  # anything (spectral_norm's power iteration, in training)
    dst = replace_wrap.load(fresh, tmp_path).eval()
    assert [b.adapted for b in replace_wrap.report(dst).blocks] == [b.adapted for b in replace_wrap.report(src).blocks]
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("when", ["before", "after"])
def test_reading_a_parametrized_neighbour_in_training_moves_none_of_its_state(when, fast_path):
    # spectral_norm advances its power iteration (its _u, _v buffers) whenever its weight is computed in
    # training. A replaced block reads the neighbour's weight outside the neighbour's forward, and so do
    # state_dict() and merge: read in training, state_dict() changed the model it saved, merge gave another
    # model than the converted one, and the saved buffers and synthesized values came from different iterations.
    def eval_out(model, x):
        model.eval()
        with torch.no_grad():
            out = model(x)
        model.train()
        return out

    torch.manual_seed(0)
    model = ResidualMLP(width=32)
    if when == "before":
        torch.nn.utils.parametrizations.spectral_norm(model.blocks[2].fc1)
    replace_wrap.convert(model, every=2, fast_path=fast_path)
    if when == "after":
        torch.nn.utils.parametrizations.spectral_norm(model.blocks[2].fc1)
    x = ResidualMLP.example()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x).square().mean().backward()
    opt.step()
    sn = model.blocks[2].fc1.parametrizations.weight[0]
    before, out = state_snapshot(model), eval_out(model, x)
    state = model.state_dict()
    assert_same_state(before, state_snapshot(model))
    plain = ResidualMLP(width=32)
    torch.nn.utils.parametrizations.spectral_norm(plain.blocks[2].fc1)
    plain.load_state_dict({k: v for k, v in state.items() if ".replacement." not in k})
    torch.testing.assert_close(eval_out(plain, x), out, rtol=0, atol=0)
    # one power iteration per training forward, in the neighbour's own forward, as in the plain model
    u = sn._u.clone()
    plain.blocks[2].fc1.parametrizations.weight[0]._u.copy_(u)
    model(x), plain(x)
    torch.testing.assert_close(sn._u, plain.blocks[2].fc1.parametrizations.weight[0]._u, rtol=0, atol=0)
    out = eval_out(model, x)
    replace_wrap.merge(model)  # in training mode
    torch.testing.assert_close(eval_out(model, x), out, rtol=0, atol=0)


def test_load_into_already_converted_model(tmp_path):
    src = _converted(ResidualMLP)
    replace_wrap.save(src, tmp_path)
    same = replace_wrap.convert(ResidualMLP(), every=2)
    _assert_bit_identical(src, replace_wrap.load(same, tmp_path))
    other = replace_wrap.convert(ResidualMLP(), policy=replace_wrap.Indices([2]))
    with pytest.raises(replace_wrap.StateDictError, match="already converted, differently"):
        replace_wrap.load(other, tmp_path)


def test_load_into_other_architecture_fails_cleanly(tmp_path):
    replace_wrap.save(_converted(ResidualMLP), tmp_path)
    shallow = ResidualMLP(depth=4)  # blocks.3 is its last block
    before = state_snapshot(shallow)
    with pytest.raises(replace_wrap.StateDictError, match="cannot re-apply the saved conversion to ResidualMLP"):
        replace_wrap.load(shallow, tmp_path)
    assert_same_state(before, state_snapshot(shallow))
    with pytest.raises(replace_wrap.StateDictError, match="are no blocks of any stack of ConvNet"):
        replace_wrap.load(ConvNet(), tmp_path)


class _EncoderDecoder(torch.nn.Module):  # two stacks, each converted on its own (other options per stack)
    def __init__(self):
        super().__init__()
        self.enc, self.dec = ResidualMLP(), ResidualMLP(n_in=4)

    def forward(self, x):
        return self.dec(self.enc(x))


def _separately_converted() -> _EncoderDecoder:
    torch.manual_seed(0)
    model = _EncoderDecoder()
    replace_wrap.convert(model.enc, every=2)
    replace_wrap.convert(model.dec, every=2, rule="convex")
    return _perturbed(model)


def test_save_refuses_a_model_whose_modules_were_converted_separately(tmp_path):
    # save recorded only the first converted module ('enc') beside the weights of both, report(model) listed only
    # 'enc', and load refused the checkpoint afterwards ("converted differently"), with a hint that could not work
    # for other options per module
    model = _separately_converted()
    x = ResidualMLP.example()
    rep = replace_wrap.report(model)
    assert [b.path for b in rep.replaced] == ["enc.blocks.1", "enc.blocks.3"]
    assert any("converted separately" in n and "'dec'" in n for n in rep.notes)
    with pytest.raises(replace_wrap.CompatibilityError, match=r"2 modules converted separately \('enc', 'dec'\)"):
        replace_wrap.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the ways the message gives: the state dict into the model converted again as here, or into the plain model
    sd = model.state_dict()
    twin = _EncoderDecoder()
    replace_wrap.convert(twin.enc, every=2)
    replace_wrap.convert(twin.dec, every=2, rule="convex")
    twin.load_state_dict(sd)
    _assert_bit_identical(model, twin)
    plain = _EncoderDecoder()
    replace_wrap.load_state_dict(plain, sd)
    torch.testing.assert_close(plain(x), model(x))


def test_save_and_read_errors(tmp_path):
    with pytest.raises(replace_wrap.NotConvertedError):
        replace_wrap.save(ResidualMLP(), tmp_path)
    with pytest.raises(replace_wrap.StateDictError, match="holds no replace_wrap conversion record"):
        replace_wrap.load(ResidualMLP(), tmp_path)
    replace_wrap.save(_converted(ResidualMLP), tmp_path)
    data = json.loads((tmp_path / RECORD_FILE).read_text())
    data["format_version"] = 99
    with pytest.raises(replace_wrap.ConfigError, match="format_version 99 is not supported.*upgrade replace_wrap"):
        ConversionRecord.from_dict(data)
    with pytest.raises(replace_wrap.ConfigError, match="not a replace_wrap conversion record"):
        ConversionRecord.from_dict({"blocks": []})


@settings(max_examples=12, deadline=None)
@given(
    depth=st.integers(3, 9),
    every=st.integers(2, 4),
    offset=st.integers(0, 2),
    rule=st.sampled_from(["linear", "convex"]),
    scalars=st.sampled_from(["block", "tensor"]),
)
def test_record_json_round_trip_reapplies_exactly(depth, every, offset, rule, scalars):
    pol = replace_wrap.Every(every, offset=offset)
    if not pol.indices(depth):
        return
    model = replace_wrap.convert(ResidualMLP(depth=depth, width=4), policy=pol, rule=rule, scalars=scalars)
    record = ConversionRecord.of(model)
    again = ConversionRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    twin = again.apply(ResidualMLP(depth=depth, width=4))
    assert ConversionRecord.of(twin).same_conversion(record)
    twin.load_state_dict(model.state_dict())
    _assert_bit_identical(model, twin)


def test_paths_policy_selects_exactly_or_fails():
    model = ResidualMLP(depth=6)
    rep = replace_wrap.plan(model, policy=replace_wrap.Paths(["blocks.2", "blocks.4"]))
    assert [b.path for b in rep.replaced] == ["blocks.2", "blocks.4"]
    one = replace_wrap.plan(model, policy=replace_wrap.Paths("blocks.3"))  # a lone string is one path
    assert [b.path for b in one.replaced] == ["blocks.3"]
    with pytest.raises(replace_wrap.PolicyError, match=r"\['blocks.9'\] is no block of any stack of ResidualMLP"):
        replace_wrap.plan(model, policy=replace_wrap.Paths(["blocks.1", "blocks.9"]))
    with pytest.raises(replace_wrap.PolicyError, match="adjacent"):
        replace_wrap.plan(model, policy=replace_wrap.Paths(["blocks.1", "blocks.2"]))
    with pytest.raises(replace_wrap.PolicyError, match="non-empty list of module paths"):
        replace_wrap.Paths([])


# --- Hugging Face save_pretrained / from_pretrained ----------------------------------------------------------


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=8, num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg)


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_hf_save_pretrained_round_trip(tmp_path):
    from transformers import ViTForImageClassification

    model = _converted(_hf_vit)
    x = torch.randn(2, 3, 16, 16)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert [b["path"] for b in saved["blocks"]] == ["vit.layers.1", "vit.layers.3"]
    twin = replace_wrap.from_pretrained(ViTForImageClassification, tmp_path)
    assert type(twin) is ViTForImageClassification
    _assert_bit_identical(model, twin)
    assert torch.equal(_logits(twin, x), _logits(model, x))
    # the plain from_pretrained loads the synthesized values: a plain model that predicts exactly the same
    plain = ViTForImageClassification.from_pretrained(tmp_path)
    assert not any(".replacement." in k for k in plain.state_dict())
    assert torch.equal(_logits(plain, x), _logits(model, x))
    with pytest.raises(replace_wrap.StateDictError, match="replace_wrap.from_pretrained"):
        replace_wrap.load(_hf_vit(), tmp_path)


def test_hf_from_pretrained_keeps_scalars_fp32_under_bf16(tmp_path):
    from transformers import ViTForImageClassification

    model = _converted(_hf_vit)
    model.save_pretrained(tmp_path)
    twin, info = replace_wrap.from_pretrained(
        ViTForImageClassification, tmp_path, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    site, ref = twin.vit.layers[1].replacement, model.vit.layers[1].replacement
    assert site.a.dtype == torch.float32 and torch.equal(site.a, ref.a) and torch.equal(site.b, ref.b)
    assert twin.vit.layers[0].attention.q_proj.weight.dtype == torch.bfloat16


def test_hf_merged_model_saves_as_plain_checkpoint(tmp_path):
    from transformers import ViTForImageClassification

    model = replace_wrap.merge(_converted(_hf_vit))
    assert not hasattr(model.config, CONFIG_KEY)
    model.save_pretrained(tmp_path)
    assert CONFIG_KEY not in json.loads((tmp_path / "config.json").read_text())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_logits(ViTForImageClassification.from_pretrained(tmp_path), x), _logits(model, x))
    with pytest.raises(replace_wrap.StateDictError, match="holds no replace_wrap conversion record"):
        replace_wrap.from_pretrained(ViTForImageClassification, tmp_path)


def test_hf_plain_model_loaded_from_a_converted_checkpoint_and_saved_is_refused_with_the_way_to_load_it(tmp_path):
    # the plain loader keeps the conversion record in the config; saved again, the checkpoint holds plain weights
    # under it: replace_wrap.from_pretrained refuses and says how to load it (it said only "not saved from the
    # converted model")
    from transformers import ViTForImageClassification

    _converted(_hf_vit).save_pretrained(tmp_path / "converted")
    plain = ViTForImageClassification.from_pretrained(tmp_path / "converted")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(replace_wrap.StateDictError, match=r"not saved from the converted model\. A plain model "
                       r"loaded from a converted checkpoint .*ModelClass\.from_pretrained\(directory\)"):
        replace_wrap.from_pretrained(ViTForImageClassification, tmp_path / "plain")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_logits(ViTForImageClassification.from_pretrained(tmp_path / "plain"), x), _logits(plain, x))
    del plain.config.replace_wrap  # what the message says drops the record
    plain.save_pretrained(tmp_path / "plain2")
    assert CONFIG_KEY not in json.loads((tmp_path / "plain2" / "config.json").read_text())


def test_hf_submodule_conversion_reloads_into_the_enclosing_model(tmp_path):
    """convert(model.vit) records the converted class in the shared config (issue 11, defect 7): the enclosing
    model's save_pretrained reloads with replace_wrap.from_pretrained, and report(model) speaks its paths."""
    from transformers import ViTForImageClassification

    model = _hf_vit()
    replace_wrap.convert(model.vit, every=2)
    assert [b.path for b in replace_wrap.report(model).replaced] == ["vit.layers.1", "vit.layers.3"]
    assert [b.path for b in replace_wrap.report(model.vit).replaced] == ["layers.1", "layers.3"]
    model.save_pretrained(tmp_path)
    twin = replace_wrap.from_pretrained(ViTForImageClassification, tmp_path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_logits(twin, x), _logits(model, x))
    assert [b.path for b in replace_wrap.report(twin).replaced] == ["vit.layers.1", "vit.layers.3"]


def test_hf_from_pretrained_refuses_a_checkpoint_of_separately_converted_modules(tmp_path):
    # Whisper's encoder and decoder share one config: the decoder's convert wrote its record over the encoder's,
    # and replace_wrap.from_pretrained rebuilt the decoder only; the encoder's scalars were dropped as unexpected
    # keys (a log line) and it came back plain, 25% more trainable parameters than the saved model
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WhisperConfig(
        vocab_size=40, d_model=16, encoder_layers=5, decoder_layers=5, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=4,
        max_source_positions=8, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )

    def build():
        torch.manual_seed(0)
        model = transformers.WhisperForConditionalGeneration(cfg)
        replace_wrap.convert(model.model.encoder, every=2)
        replace_wrap.convert(model.model.decoder, every=2)
        return model

    model = _perturbed(build()).eval()
    feats, ids = torch.randn(1, 4, 16), torch.randint(3, 40, (1, 5))
    with torch.no_grad():
        want = model(input_features=feats, decoder_input_ids=ids).logits
    assert any("'model.decoder'" in n for n in replace_wrap.report(model).notes)
    model.save_pretrained(tmp_path)
    with pytest.raises(replace_wrap.StateDictError, match=r"holds scalars of replaced blocks that its config\.json "
                       r"record does not convert \(\['model\.encoder\.layers\.1\.replacement\.a'.*converted "
                       r"separately.*plain loader"):
        replace_wrap.from_pretrained(transformers.WhisperForConditionalGeneration, tmp_path)
    # the ways the message gives: the plain loader, or the model converted as before and the weights loaded
    from safetensors.torch import load_file

    plain = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    twin = build().eval()
    twin.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)  # proj_out: tied, unsaved
    with torch.no_grad():
        for m in (plain, twin):
            assert torch.equal(m(input_features=feats, decoder_input_ids=ids).logits, want)



def test_hf_from_pretrained_loads_a_head_models_checkpoint_into_its_base_model(tmp_path):
    # Hugging Face loads ViTForImageClassification's checkpoint into ViTModel (AutoModel) by dropping
    # base_model_prefix ("vit.") from its keys; replace_wrap.from_pretrained refused it ("Paths: ['vit.layers.1',
    # ...] are no blocks of any stack of ViTModel"), advising plan() and example_inputs
    from transformers import ViTModel

    model = _converted(_hf_vit).eval()
    model.save_pretrained(tmp_path)
    base, info = replace_wrap.from_pretrained(ViTModel, tmp_path, output_loading_info=True)
    assert [b.path for b in replace_wrap.report(base).replaced] == ["layers.1", "layers.3"]
    assert all(k.startswith("pooler.") for k in info["missing_keys"])  # the classifier's ViT has no pooler
    assert all(k.startswith("classifier.") for k in info["unexpected_keys"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(base.eval()(pixel_values=x).last_hidden_state, model.vit(pixel_values=x).last_hidden_state)
    assert torch.equal(base.layers[1].replacement.a, model.vit.layers[1].replacement.a)



@pytest.mark.parametrize("family", ["OPT", "Gemma"])
def test_hf_report_counts_tied_embeddings_once_after_from_pretrained(tmp_path, family):
    """from_pretrained converts before Hugging Face ties the embeddings (issue 11, defect 2): the report must count
    the model as it is, each tied tensor once."""
    import transformers as T

    if family == "OPT":
        cfg = T.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, ffn_dim=32,
                          word_embed_proj_dim=16, max_position_embeddings=32)
        cls = T.OPTForCausalLM
    else:
        cfg = T.GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        cls = T.GemmaForCausalLM
    model = replace_wrap.convert(cls(cfg), every=2)
    model.save_pretrained(tmp_path)
    twin = replace_wrap.from_pretrained(cls, tmp_path)
    assert twin.get_input_embeddings().weight is twin.get_output_embeddings().weight  # tied
    rep = replace_wrap.report(twin)
    trainable = sum(p.numel() for p in twin.parameters() if p.requires_grad)
    assert rep.trainable_after == trainable
    assert rep.trainable_before == trainable + sum(b.params_saved for b in rep.replaced) - 2 * len(rep.replaced)


def _tied_stacks_model():
    """Two stacks tied layer by layer through ``_tied_weights_keys`` (DiffusionGemma ties its encoder's layers to
    its decoder's so): Hugging Face ties them in ``post_init``, but ``from_pretrained`` only after loading."""
    import transformers as T
    from torch import nn

    class Cfg(T.PretrainedConfig):
        model_type = "replace_wrap_tied_stacks"

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc2(torch.tanh(self.fc1(x)))

    class Net(T.PreTrainedModel):
        config_class = Cfg
        _tied_weights_keys = {r"enc\.\d+\.fc1\.weight": r"dec\.\d+\.fc1\.weight"}

        def __init__(self, config):
            super().__init__(config)
            self.enc = nn.ModuleList(Block() for _ in range(5))
            self.dec = nn.ModuleList(Block() for _ in range(5))
            self.post_init()

        def forward(self, x):
            for b in (*self.enc, *self.dec):
                x = b(x)
            return x

    return Net, Cfg(tie_word_embeddings=True)


def test_hf_from_pretrained_keeps_stack_ties_it_has_yet_to_make(tmp_path):
    """The conversion replayed before Hugging Face ties the stacks must keep the tied tensors as the saved one
    did (it refused with a StateDictError: 'analysis gives 4 tensors'), and predict the same."""
    net, cfg = _tied_stacks_model()
    torch.manual_seed(0)
    model = _perturbed(replace_wrap.convert(net(cfg), every=2))
    kept = {b.path: b.kept_tensors for b in replace_wrap.report(model).replaced}
    assert kept["enc.1"] == (("fc1.weight", "shared with dec.1.fc1.weight"),)
    model.save_pretrained(tmp_path)
    twin = replace_wrap.from_pretrained(net, tmp_path)
    assert {b.path: b.kept_tensors for b in replace_wrap.report(twin).replaced} == kept
    assert twin.enc[1].fc1.weight is twin.dec[1].fc1.weight
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
