"""ReplaceConfig validation and round-trips; options passed to convert."""

from __future__ import annotations

import pytest

import replace_wrap
from replace_wrap import ConfigError, ReplaceConfig
from toys import ResidualMLP


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rule": "cubic"}, r"unknown integration rule 'cubic'; registered rules: .*convex.*linear"),
        ({"rule": 3}, r"rule must be a rule name \(str\), got 3"),
        ({"scalars": "layer"}, r"scalars must be one of 'block', 'tensor'; got 'layer'"),
        ({"neighbour_grad": "both"}, r"neighbour_grad must be one of 'detached', 'coupled'; got 'both'"),
        ({"keep_original": 1}, r"keep_original must be True or False, got 1"),
        ({"init": (0.5,)}, r"init must be 'fit' or two finite numbers \(a, b\), got \(0.5,\)"),
        ({"init": (float("nan"), 0.5)}, r"init must be 'fit' or two finite numbers"),
        ({"init": "auto"}, r"init must be 'fit' or two finite numbers \(a, b\), got 'auto'"),
        ({"rule": "convex", "init": (0.3, 0.3)}, r"rule='convex' needs init=\(a, 1 - a\)"),
        ({"version": 4}, r"config version 4 is not supported"),
        ({"version": 2}, r"config version 2 is not supported.*from_dict reads versions 1 and 2"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ReplaceConfig(**kwargs)


def test_round_trip():
    cfg = ReplaceConfig(rule="convex", scalars="tensor", neighbour_grad="coupled", keep_original=True, init=(0.25, 0.75))
    assert ReplaceConfig.from_dict(cfg.to_dict()) == cfg
    cfg = ReplaceConfig(init="fit")
    assert cfg.to_dict()["init"] == "fit" and ReplaceConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown ReplaceConfig field\(s\) \['colour'\]"):
        ReplaceConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_convert_options_override_config_and_unknown_options_fail():
    model = ResidualMLP()
    replace_wrap.convert(model, config=ReplaceConfig(rule="convex"), scalars="tensor")
    cfg = replace_wrap.report(model).config
    assert (cfg.rule, cfg.scalars) == ("convex", "tensor")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['evry'\] for convert\(\)"):
        replace_wrap.convert(ResidualMLP(), evry=2)
    with pytest.raises(ConfigError, match="config must be a replace_wrap.ReplaceConfig, got dict"):
        replace_wrap.convert(ResidualMLP(), config={"rule": "linear"})


def test_tensor_scalars_and_convex_rule_parameter_counts():
    model = ResidualMLP(depth=5)
    replace_wrap.convert(model, scalars="tensor")
    site = model.blocks[1].replacement
    n = len(site.tensor_names)
    assert n == 6 and site.a.shape == (n,) and site.b.shape == (n,)
    model = ResidualMLP(depth=5)
    replace_wrap.convert(model, rule="convex", init=(0.2, 0.8))
    site = model.blocks[1].replacement
    assert [name for name, _ in site.named_parameters()] == ["alpha"]
    a, b = site.coefficients()
    assert abs(a.item() - 0.2) < 1e-6 and abs(b.item() - 0.8) < 1e-6
