"""Which path and estimator each replaced layer takes, as the report says and convert logs; and the config's
``ab_grad_sample`` default ("auto"), its exact settings and the migration of version-1 configs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import replace_wrap
from replace_wrap import ReplaceConfig
from toys import ConvNet, ResidualMLP, TinyTransformer

AUTO = "sampled: m = max(16, N/64) of N rows (tokens), exact when m >= N"


def _routes(model):
    return {f"{b.path}.{r.path}": r for b in replace_wrap.report(model).replaced for r in b.layers}


def test_default_routes_name_kernel_and_estimator_per_layer():
    routes = _routes(replace_wrap.convert(TinyTransformer(), every=2))
    linear = [r for r in routes.values() if r.layer == "Linear"]
    assert linear and all(r.route == "kernel 'linear'" and r.estimator == AUTO for r in linear)
    norms = [r for r in routes.values() if r.layer == "LayerNorm"]
    assert norms and all(r.generic and r.estimator == "exact (autograd): no layer kernel for LayerNorm" for r in norms)
    conv = _routes(replace_wrap.convert(ConvNet(), every=2))
    assert {r.estimator for r in conv.values() if r.layer == "Conv2d"} == {
        "sampled: m = max(16, N/64) of N output positions (batch x spatial), exact when m >= N"
    }


@pytest.mark.parametrize(
    "options, estimator",
    [
        ({"ab_grad_sample": "exact"}, "exact"),
        ({"ab_grad_sample": None}, "exact"),
        ({"ab_grad_sample": 0.25}, "sampled: m = ceil(0.25 N) of N rows (tokens)"),
        ({"neighbour_grad": "coupled"}, "exact: neighbour_grad='coupled' needs the full weight gradient"),
    ],
)
def test_routes_follow_the_options(options, estimator):
    routes = _routes(replace_wrap.convert(ResidualMLP(), every=2, **options))
    assert {r.estimator for r in routes.values() if r.layer == "Linear"} == {estimator}


@pytest.mark.parametrize(
    "options, why",
    [
        ({"fast_path": False}, "fast_path=False"),
        ({"rule": "ema"}, "the rule is not a linear mix of the neighbours"),
    ],
)
def test_generic_routes_say_why(options, why):
    routes = _routes(replace_wrap.convert(ResidualMLP(), every=2, **options))
    assert {r.estimator for r in routes.values() if r.layer == "Linear"} == {f"exact (autograd): {why}"}


class OwnLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1


class OwnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = OwnLinear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return x + self.norm(self.fc(x))


def test_layers_without_kernel_are_reported_and_a_matrix_on_the_generic_path_is_a_warning(caplog):
    net = nn.Sequential(*[OwnBlock() for _ in range(5)])
    with caplog.at_level(logging.INFO, logger="replace_wrap"):
        replace_wrap.convert(net, every=2)
    routes = _routes(net)
    assert routes["1.fc"].estimator == "exact (autograd): OwnLinear redefines a method that kernel 'linear' relies on"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 replaced layer(s) with weight matrices take the generic path" in warnings[0]
    assert "OwnLinear" in warnings[0] and "LayerNorm" not in warnings[0]  # per-channel norms only in the report
    assert "on the generic path (OwnLinear x2" in str(replace_wrap.report(net))


def test_an_explicit_fraction_that_cannot_apply_is_named(caplog):
    with caplog.at_level(logging.WARNING, logger="replace_wrap"):
        replace_wrap.convert(TinyTransformer(), every=2, ab_grad_sample=0.25, neighbour_grad="coupled")
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "ab_grad_sample=0.25 does not apply to" in msg and "coupled" in msg
    assert "LayerNorm" not in msg  # per-channel tensors: exact costs nothing there, the report lists them
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="replace_wrap"):
        replace_wrap.convert(ResidualMLP(), every=2)  # the default on a model it fully serves: nothing to say
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_report_to_dict_carries_the_routes():
    rep = replace_wrap.report(replace_wrap.convert(ResidualMLP(), every=2)).to_dict()
    (fc1,) = [r for r in rep["blocks"][1]["layers"] if r["path"] == "fc1"]
    assert fc1["route"] == "kernel 'linear'" and fc1["estimator"] == AUTO and list(fc1["tensors"]) == ["weight", "bias"]
    json.dumps(rep)


# --- the config --------------------------------------------------------------------------------------------


def test_default_is_auto_and_exact_is_one_option_away():
    assert ReplaceConfig().ab_grad_sample == "auto"
    for exact in ("exact", None, 1.0, 1):
        assert ReplaceConfig(ab_grad_sample=exact).ab_grad_sample is None  # stored as 0.1 stored it
    assert ReplaceConfig(ab_grad_sample="auto", fast_path=False).fast_path is False  # "auto" only where it applies
    cfg = ReplaceConfig()
    assert ReplaceConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_version_1_configs_keep_their_meaning():
    old = ReplaceConfig(ab_grad_sample=None).to_dict() | {"version": 1}
    assert ReplaceConfig.from_dict(old) == ReplaceConfig(ab_grad_sample=None)  # null: exact, as it was
    del old["ab_grad_sample"]
    assert ReplaceConfig.from_dict(old).ab_grad_sample is None  # a v1 record without the field: v1's default
    sampled = ReplaceConfig.from_dict(old | {"ab_grad_sample": 0.0625})
    assert sampled.ab_grad_sample == 0.0625 and sampled.version == 3
    with pytest.raises(replace_wrap.ConfigError, match="config version 4 is not supported"):
        ReplaceConfig.from_dict(old | {"version": 4})


def test_a_0_1_checkpoint_loads_with_the_exact_estimator():
    from pathlib import Path

    data = Path(__file__).resolve().parent / "data" / "checkpoint_0_1" / "sequential"
    record = replace_wrap.ConversionRecord.from_dict(json.loads((data / "replace_wrap.json").read_text()))
    assert record.config.ab_grad_sample is None and record.config.version == 3
    assert record.config.init == (0.5, 0.5)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)) for _ in range(5)])

    model = replace_wrap.load(make(), data)
    assert {r.estimator for b in replace_wrap.report(model).replaced for r in b.layers if r.layer == "Linear"} == {
        "exact"
    }
