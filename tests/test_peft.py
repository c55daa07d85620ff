"""PEFT (LoRA) on converted models: the supported order trains, saves, loads and merges exactly; the rest is
refused with IntegrationError at the first call that would go wrong."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import replace_wrap
from conftest import TOL, assert_same_state, state_snapshot
from replace_wrap.integrations import peft as rw_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def lora(**kw) -> object:
    return peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, **kw)


X = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def trained(steps: int = 3, **kw) -> torch.nn.Module:
    model = rw_peft.get_peft_model(replace_wrap.convert(llama(), every=2), lora(**kw))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(steps):
        x = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture(scope="module")
def model():
    return trained()


def test_scalars_and_lora_train(model):
    # PEFT froze everything but LoRA; prepare() made the scalars trainable again, and they moved
    scalars = replace_wrap.scalars(model)
    assert list(scalars) == ["base_model.model.model.layers.1", "base_model.model.model.layers.3"]
    assert all(abs(a - 0.5) > 1e-4 and abs(b - 0.5) > 1e-4 for a, b in scalars.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or ".replacement." in n}
    assert sum(".replacement." in n for n in trainable) == 4
    # the report reads through the PeftModel, with the PeftModel's paths (as scalars() gives them)
    assert [b.path for b in replace_wrap.report(model).replaced] == list(scalars)


def test_replaced_layer_is_the_lora_base_layer(model):
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    assert isinstance(q, peft.tuners.lora.Linear) and "weight" not in q.base_layer._parameters
    prev = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    nxt = model.base_model.model.model.layers[2].self_attn.q_proj.base_layer.weight
    site = model.base_model.model.model.layers[1].replacement
    torch.testing.assert_close(q.base_layer.weight, site.a * prev + site.b * nxt, rtol=0, atol=1e-7)


def test_merge_and_unload_is_exact_in_either_order(model):
    ref = logits(model)
    merged = copy.deepcopy(model).merge_and_unload()  # materializes the replaced layers first
    assert type(merged) is transformers.LlamaForCausalLM
    assert not any(".replacement." in k or "lora_" in k for k in merged.state_dict())
    assert (logits(merged) - ref).abs().max() <= TOL["merge"]
    twin = copy.deepcopy(model)
    replace_wrap.merge(twin)  # through PEFT's wrappers: the LoRA layers keep their now plain base layers
    assert (logits(twin) - ref).abs().max() <= TOL["merge"]
    assert (logits(twin.merge_and_unload()) - ref).abs().max() <= TOL["merge"]


def test_merge_adapter_is_refused_while_blocks_are_replaced(model):
    twin = copy.deepcopy(model)
    with pytest.raises(replace_wrap.IntegrationError, match=r"replace_wrap.merge\(peft_model\) first"):
        twin.merge_adapter()
    replace_wrap.merge(twin)
    twin.merge_adapter()  # a plain base now: PEFT's reversible merge works
    assert (logits(twin) - logits(model)).abs().max() <= TOL["merge"]


def test_save_pretrained_loads_exactly_both_ways(model, tmp_path):
    ref = logits(model)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.replacement.a" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight" in keys  # through LoRA's wrapper
    assert "base_model.model.model.layers.1.mlp.up_proj.weight" in keys
    assert json.loads((tmp_path / "replace_wrap.json").read_text())["blocks"][0]["path"] == "model.layers.1"
    # our loader: converts the fresh base as recorded, loads, prepares
    again = rw_peft.from_pretrained(llama(), tmp_path)
    assert torch.equal(logits(again), ref)
    assert replace_wrap.scalars(again) == replace_wrap.scalars(model)
    # PEFT's own loader on a plain base: the replaced layers get their synthesized values, a plain model
    plain = peft.PeftModel.from_pretrained(llama(), tmp_path)
    assert not any(".replacement." in n for n, _ in plain.named_parameters())
    assert torch.equal(logits(plain), ref)


def test_two_adapters_on_different_modules_each_load_exactly_both_ways(tmp_path):
    # "default" wraps q_proj, "other" v_proj: the live model wraps both, and a replaced v_proj sits under
    # other's LoRA wrapper. PEFT's loader of "default" alone has a plain v_proj: each adapter's file must name
    # the replaced tensors as that loader looks them up, else they keep the base model's values silently.
    converted = replace_wrap.convert(llama(), every=2)
    model = rw_peft.get_peft_model(converted, peft.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=False))
    model.add_adapter("other", peft.LoraConfig(target_modules=["v_proj"], r=2, init_lora_weights=False))
    with torch.no_grad():  # scalars away from their start, so the replaced layers differ from the base ones
        for i, (_, _, site) in enumerate(replace_wrap.surgery.apply.sites(model)):
            site.a.fill_(0.3 + 0.1 * i)
            site.b.fill_(0.9 - 0.2 * i)
    model.save_pretrained(tmp_path)
    for name, directory in (("default", tmp_path), ("other", tmp_path / "other")):
        model.set_adapter(name)
        ref = logits(model)
        plain = peft.PeftModel.from_pretrained(llama(), directory, adapter_name=name)
        assert not any(".replacement." in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(logits(plain), ref, rtol=0, atol=1e-6, msg=name)
        again = rw_peft.from_pretrained(llama(), directory, adapter_name=name)
        torch.testing.assert_close(logits(again), ref, rtol=0, atol=1e-6, msg=name)
    # the two adapters loaded one after the other into one plain base: each predicts as trained
    both = peft.PeftModel.from_pretrained(llama(), tmp_path)
    both.load_adapter(tmp_path / "other", adapter_name="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        both.set_adapter(name)
        torch.testing.assert_close(logits(both), logits(model), rtol=0, atol=1e-6, msg=name)


def test_from_pretrained_refuses_an_adapter_without_scalars(tmp_path):
    raw = peft.get_peft_model(replace_wrap.convert(llama(), every=2), lora())
    raw.save_pretrained(tmp_path)  # raw PEFT: no scalars in the adapter
    (tmp_path / "replace_wrap.json").write_text(
        json.dumps(replace_wrap.ConversionRecord.of(raw.base_model.model).to_dict())
    )
    with pytest.raises(replace_wrap.StateDictError, match="holds no scalars of the replaced blocks"):
        rw_peft.from_pretrained(llama(), tmp_path)


def test_raw_peft_on_a_converted_model_is_refused_until_prepared(tmp_path):
    raw = peft.get_peft_model(replace_wrap.convert(llama(), every=2), lora())
    with pytest.raises(replace_wrap.IntegrationError, match="replace_wrap.integrations.peft.prepare"):
        raw(input_ids=X)
    trained().save_pretrained(tmp_path)
    with pytest.raises(replace_wrap.IntegrationError, match="not prepared"):
        peft.PeftModel.from_pretrained(replace_wrap.convert(llama(), every=2), tmp_path)
    rw_peft.prepare(raw)
    assert raw(input_ids=X).logits.shape == (2, 8, 64)
    assert all(p.requires_grad for _, _, s in replace_wrap.surgery.apply.sites(raw) for p in s.parameters())


def test_convert_after_peft_is_refused_and_leaves_the_model_unchanged():
    wrapped = peft.get_peft_model(llama(), lora())
    before = state_snapshot(wrapped)
    with pytest.raises(replace_wrap.IntegrationError, match="convert the base model first"):
        replace_wrap.convert(wrapped, every=2)
    assert_same_state(before, state_snapshot(wrapped))
    with pytest.raises(replace_wrap.IntegrationError, match="already holds PEFT layers"):
        replace_wrap.convert(wrapped.base_model.model, every=2)  # LoRA layers injected in the plain model


def test_scalars_as_modules_to_save_are_refused():
    converted = replace_wrap.convert(llama(), every=2)
    with pytest.raises(replace_wrap.IntegrationError, match="modules_to_save"):
        rw_peft.get_peft_model(converted, lora(modules_to_save=["replacement"]))


def test_modules_to_save_inside_replaced_blocks_is_refused_up_front_and_leaves_the_model_unchanged(tmp_path):
    # every block has a post_attention_layernorm; in the replaced blocks 1 and 3 it has no weight of its own
    converted = replace_wrap.convert(llama(), every=2)
    ref = logits(converted)  # (eval mode, before the snapshot)
    before = state_snapshot(converted)
    wanted = [
        "modules_to_save cannot wrap a module of a replaced block",
        "['model.layers.1.post_attention_layernorm', 'model.layers.3.post_attention_layernorm']",
        "'model.layers.0.post_attention_layernorm'",  # the next step: the kept neighbour's, by full path
        "replace_wrap.merge(model) first",
        "The model was left unchanged",
    ]
    with pytest.raises(replace_wrap.IntegrationError) as err:
        rw_peft.get_peft_model(converted, lora(modules_to_save=["post_attention_layernorm"]))
    assert all(w in str(err.value) for w in wanted), str(err.value)
    assert_same_state(before, state_snapshot(converted))
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in converted.modules())
    assert torch.equal(logits(converted), ref)
    with pytest.raises(replace_wrap.IntegrationError, match=r"holding the replaced block\(s\) \['model.layers.1', "):
        rw_peft.get_peft_model(converted, lora(modules_to_save=["layers"]))  # a copy of all the blocks
    # the same through plain PEFT, then prepare: refused, the PEFT model is left unprepared (it refuses to run)
    raw = peft.get_peft_model(converted, lora(modules_to_save=["post_attention_layernorm"]))
    with pytest.raises(replace_wrap.IntegrationError, match=r"'base_model.model.model.layers.1.post_attention_layernorm'.*left unprepared"):
        rw_peft.prepare(raw)
    with pytest.raises(replace_wrap.IntegrationError, match="replace_wrap.integrations.peft.prepare"):
        raw(input_ids=X)
    # a second adapter added to a prepared model (add_adapter, also load_adapter's way): refused before PEFT wraps
    model = rw_peft.get_peft_model(replace_wrap.convert(llama(), every=2), lora())
    before = state_snapshot(model)
    with pytest.raises(replace_wrap.IntegrationError, match="modules_to_save cannot wrap a module of a replaced"):
        model.add_adapter("other", lora(modules_to_save=["post_attention_layernorm"]))
    assert list(model.peft_config) == ["default"]
    assert_same_state(before, state_snapshot(model))


def test_modules_to_save_on_a_kept_neighbour_trains_saves_and_merges_exactly(tmp_path):
    model = rw_peft.get_peft_model(
        replace_wrap.convert(llama(), every=2), lora(modules_to_save=["model.layers.0.post_attention_layernorm"])
    )
    norm = model.base_model.model.model.layers[0].post_attention_layernorm
    assert isinstance(norm, peft.utils.ModulesToSaveWrapper)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the trained copy and the scalars away from their start
        norm.modules_to_save["default"].weight.copy_(torch.rand(32, generator=g) + 0.5)
        for _, _, site in replace_wrap.surgery.apply.sites(model):
            site.a.fill_(0.3)
            site.b.fill_(0.8)
    ref = logits(model)
    # the oracle, by hand: a plain model with the copy's norm in block 0, and blocks 1 and 3 mixed from their
    # neighbours' base tensors (a replaced block reads the neighbour's original, as it reads LoRA's base_layer;
    # LoRA starts at zero, so it adds nothing)
    oracle = llama()
    base = {k: v.clone() for k, v in oracle.state_dict().items()}
    state = dict(base, **{"model.layers.0.post_attention_layernorm.weight": norm.modules_to_save["default"].weight})
    for i in (1, 3):
        for k in [k for k in base if k.startswith(f"model.layers.{i}.")]:
            rest = k[len(f"model.layers.{i}."):]
            state[k] = 0.3 * base[f"model.layers.{i - 1}.{rest}"] + 0.8 * base[f"model.layers.{i + 1}.{rest}"]
    oracle.load_state_dict(state)
    torch.testing.assert_close(ref, logits(oracle), rtol=0, atol=TOL["oracle"])
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(llama(), tmp_path)), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(rw_peft.from_pretrained(llama(), tmp_path)), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(copy.deepcopy(model).merge_and_unload()), ref, rtol=0, atol=TOL["merge"])


def test_get_peft_model_needs_a_converted_model():
    with pytest.raises(replace_wrap.NotConvertedError, match="peft.get_peft_model is all you need"):
        rw_peft.get_peft_model(llama(), lora())


def test_recipe_example(tmp_path):
    from conftest import load_example

    example = load_example("peft_recipe")
    result = example.main(["--steps", "3", "--layers", "5", "--hidden", "64", "--vocab", "128"])
    assert result["merged_type"] == "LlamaForCausalLM"
    assert result["diffs"]["replace_wrap.integrations.peft.from_pretrained"] == 0.0
    assert result["diffs"]["PeftModel.from_pretrained (plain base)"] == 0.0
    assert result["diffs"]["merge_and_unload"] <= TOL["merge"]


def test_trainer_saves_the_adapter_with_scalars_and_resumes_exactly(tmp_path):
    from transformers import Trainer, TrainingArguments

    def make(seed: int) -> torch.nn.Module:
        model = rw_peft.get_peft_model(replace_wrap.convert(llama(), every=2), lora())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the trainable tensors start elsewhere for each seed
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return model

    def fit(model, out, resume=None):
        g = torch.Generator().manual_seed(7)
        data = [{"input_ids": (x := torch.randint(0, 64, (8,), generator=g)), "labels": x} for _ in range(16)]
        args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
            save_steps=2, use_cpu=True, disable_tqdm=True, seed=0, max_steps=4,
        )
        Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)

    first = make(0)
    fit(first, tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "replace_wrap.json").is_file()  # Trainer saved through the prepared save_pretrained
    second = make(1)
    fit(second, tmp_path / "b", resume=str(checkpoint))  # PEFT's load_adapter into the prepared model
    sa, sb = first.state_dict(), second.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(p.requires_grad for n, p in second.named_parameters() if ".replacement." in n)
