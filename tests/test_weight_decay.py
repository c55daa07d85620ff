"""No weight decay on the replaced blocks' scalars: param_groups, convert/merge(optimizers=), timm's optimizer
factory, Hugging Face's Trainer (whatever the import order), and a warning for a plain AdamW(model.parameters())."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import replace_wrap
from conftest import run_python
from toys import ResidualMLP, tiny_hf_vit, tiny_timm_vit


def _ids(ps):
    return {id(p) for p in ps}


def _scalars(model):
    return [p for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite) for p in m.parameters()]


def test_param_groups_split_decay_norms_biases_and_scalars():
    model = replace_wrap.convert(ResidualMLP(), every=2)
    groups = replace_wrap.param_groups(model, weight_decay=0.05, scalar_lr=1e-2)
    decayed, plain, scalars = groups
    # independent of the rule's code: the toy's parameters by name
    named = dict(model.named_parameters())
    want_decay = {n for n in named if n.endswith(".weight") and ".fc" in n or n in ("head.weight", "proj.weight")}
    assert _ids(decayed["params"]) == _ids(named[n] for n in want_decay) and decayed["weight_decay"] == 0.05
    assert _ids(scalars["params"]) == _ids(_scalars(model)) and scalars["lr"] == 1e-2 and scalars["weight_decay"] == 0
    assert _ids(plain["params"]) == _ids(p for n, p in named.items() if n not in want_decay and "replacement" not in n)
    assert plain["weight_decay"] == 0.0 and "lr" not in plain
    assert all(named[n].dim() >= 2 for n in want_decay)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decay watch has nothing to say
        model(ResidualMLP.example()).square().mean().backward()
        opt.step()


def test_param_groups_follow_timm_no_weight_decay():
    model = replace_wrap.convert(tiny_timm_vit(3), every=2)
    decayed = _ids(replace_wrap.param_groups(model, weight_decay=0.1)[0]["params"])
    assert id(model.pos_embed) not in decayed and id(model.cls_token) not in decayed  # model.no_weight_decay()
    assert id(model.blocks[0].attn.qkv.weight) in decayed and id(model.blocks[0].norm1.weight) not in decayed


def test_a_plain_adamw_that_decays_the_scalars_warns_once():
    model = replace_wrap.convert(ResidualMLP(), every=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    with pytest.warns(UserWarning, match=r"AdamW applies weight_decay=0.01 to 4 scalar\(s\) of replaced blocks.*"
                                         r"replace_wrap.param_groups\(model, weight_decay=0.01\)"):
        model(ResidualMLP.example()).square().mean().backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer
        opt.step()


def test_convert_with_optimizers_puts_the_scalars_in_a_group_without_decay(caplog):
    model = ResidualMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    with caplog.at_level(logging.WARNING, logger="replace_wrap"):
        replace_wrap.convert(model, every=2, optimizers=opt)
    assert "added a parameter group with weight_decay=0" in caplog.text
    assert len(opt.param_groups) == 2
    new = opt.param_groups[1]
    assert new["weight_decay"] == 0.0 and new["lr"] == 1e-3 and new["betas"] == opt.param_groups[0]["betas"]
    assert _ids(new["params"]) == _ids(_scalars(model))
    # merge: the restored tensors go back to the decayed group, as their neighbours' (norms and biases too: this
    # optimizer decays every other block's)
    replace_wrap.merge(model, optimizers=opt)
    block = model.blocks[1]
    for p in (block.fc1.weight, block.fc1.bias, block.norm.weight):
        assert id(p) in _ids(opt.param_groups[0]["params"])
    # an optimizer that already has a no-decay group (HF, timm): the scalars join it, no group is added
    model = ResidualMLP()
    opt = torch.optim.AdamW(replace_wrap.param_groups(model, weight_decay=0.1), lr=1e-3)
    replace_wrap.convert(model, every=2, optimizers=opt)
    assert len(opt.param_groups) == 2 and _ids(_scalars(model)) <= _ids(opt.param_groups[1]["params"])


def test_timm_optimizer_factory_leaves_the_scalars_undecayed():
    from timm.optim import create_optimizer_v2

    model = replace_wrap.convert(tiny_timm_vit(3), every=2)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    for p in _scalars(model):
        (group,) = [g for g in opt.param_groups if id(p) in _ids(g["params"])]
        assert group["weight_decay"] == 0.0


def _group_of(opt, p):
    (group,) = [g for g in opt.param_groups if id(p) in _ids(g["params"])]
    return group


def test_merge_after_timm_layer_decay_restores_each_block_into_its_layers_decayed_group(caplog):
    """Found by a user-scenario hunt: timm's layer-wise lr decay gives every block its own groups (lr_scale);
    a replaced ViT block holds only its scalars, so merge(optimizers=) found no decayed group with the block's
    lr_scale and left its restored weight matrices silently undecayed."""
    from timm.optim import create_optimizer_v2

    model = replace_wrap.convert(tiny_timm_vit(5), every=2)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {i: _group_of(opt, model.blocks[i].replacement.a)["lr_scale"] for i in (1, 3)}
    with caplog.at_level(logging.WARNING, logger="replace_wrap"):
        replace_wrap.merge(model, optimizers=opt)
    assert "weight_decay=0.05" in caplog.text  # the added decayed group is logged
    for i in (1, 3):
        block = model.blocks[i]
        for p in (block.attn.qkv.weight, block.attn.proj.weight, block.mlp.fc1.weight, block.mlp.fc2.weight):
            group = _group_of(opt, p)
            assert (group["weight_decay"], group["lr_scale"]) == (0.05, scale[i])
        for p in (block.norm1.weight, block.norm1.bias, block.attn.qkv.bias):
            group = _group_of(opt, p)
            assert (group["weight_decay"], group["lr_scale"]) == (0.0, scale[i])


def test_merge_after_param_groups_with_a_scalar_lr_trains_the_restored_tensors_as_their_neighbours():
    """Found by a user-scenario hunt: the scalars' own group of param_groups(scalar_lr=) has their lr, so no
    decayed group had the same options and merge(optimizers=) left the restored weight matrices undecayed, and
    every restored tensor trained at the scalars' lr (10x here). That group's options are the scalars' alone
    (its name says so): the restored tensors join their neighbours' groups, as a fresh optimizer has them."""
    model = replace_wrap.convert(ResidualMLP(), every=2)
    opt = torch.optim.AdamW(replace_wrap.param_groups(model, weight_decay=0.05, scalar_lr=1e-2), lr=1e-3)
    assert opt.param_groups[2]["name"] == "replace_wrap.scalars"
    replace_wrap.merge(model, optimizers=opt)
    assert len(opt.param_groups) == 3 and not opt.param_groups[2]["params"]  # no group added; the scalars gone
    block = model.blocks[1]
    for p, group in ((block.fc1.weight, 0), (block.fc2.weight, 0), (block.fc1.bias, 1), (block.norm.weight, 1)):
        assert any(q is p for q in opt.param_groups[group]["params"])
        assert (_group_of(opt, p)["lr"], _group_of(opt, p)["weight_decay"]) == (1e-3, (0.05, 0.0)[group])


@pytest.mark.parametrize("setup", ["one_group", "param_groups"])
def test_merge_gives_restored_tensors_their_neighbours_weight_decay(setup):
    """Found in review: with one group that decays everything (the plain AdamW(model.parameters(), ...)), convert
    put the scalars in a no-decay twin and merge left the restored biases and norms there, undecayed, where every
    other block's (and a fresh optimizer's) decay. A restored tensor now decays as its neighbours' same tensor."""
    model = ResidualMLP()
    params = model.parameters() if setup == "one_group" else None
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05) if params is not None else None
    replace_wrap.convert(model, every=2, optimizers=opt)
    if opt is None:
        opt = torch.optim.AdamW(replace_wrap.param_groups(model, weight_decay=0.05), lr=1e-3)
    replace_wrap.merge(model, optimizers=opt)
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters())  # each tensor once, every tensor
    for name, p in model.named_parameters():
        want = 0.05 if setup == "one_group" or (p.dim() >= 2 and "norm" not in name) else 0.0
        assert _group_of(opt, p)["weight_decay"] == want, name


def _trainer_decay(model):
    import tempfile

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, weight_decay=0.1)
    trainer = Trainer(model=model, args=args)
    opt = trainer.create_optimizer()
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def test_hf_trainer_gives_the_scalars_no_decay():
    pytest.importorskip("accelerate")
    model = replace_wrap.convert(tiny_hf_vit(3), every=2)
    decay = _trainer_decay(model)
    assert all(decay[id(p)] == 0.0 for p in _scalars(model))
    assert decay[id(model.get_parameter("vit.layers.0.attention.q_proj.weight"))] == 0.1  # the rest as before


@pytest.mark.parametrize("imported", ["transformers", "nothing"])
def test_hf_trainer_imported_after_convert_gives_the_scalars_no_decay(tmp_path, monkeypatch, imported):
    """In a fresh process: transformers' trainer module is imported only after convert (the import hook); with
    ``nothing``, transformers itself too (a timm or plain model converted before the script imports the Trainer:
    the scalars were decayed)."""
    pytest.importorskip("accelerate")
    first, build = (
        ("import transformers\n", "tiny_hf_vit(3)") if imported == "transformers" else ("", "ResidualMLP(width=32)")
    )
    code = (
        f"import sys, replace_wrap\n{first}"
        "from toys import tiny_hf_vit, ResidualMLP\n"
        "assert 'transformers.trainer' not in sys.modules\n"
        f"assert ('transformers' in sys.modules) == {imported == 'transformers'}\n"
        f"model = replace_wrap.convert({build}, every=2)\n"
        "from test_weight_decay import _trainer_decay, _scalars\n"
        "decay = _trainer_decay(model)\n"
        "print(sorted({decay[id(p)] for p in _scalars(model)}), sorted(set(decay.values())))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).parent))  # toys, this module
    out = run_python("-c", code, TMPDIR=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0.0] [0.0, 0.1]"
