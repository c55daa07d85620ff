"""Shared fixtures: seeded toy models, the tolerance table and the oracle used by the contract tests."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch

# One tolerance table for the whole suite (absolute), keyed by what is compared.
TOL = {
    "merge": 1e-6,  # merged vs converted outputs, eval, fp32 (the bound)
    "oracle": 1e-5,  # converted vs directly synthesized weights (different op order inside deep models)
    "exact": 0.0,
}

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


def state_snapshot(model: torch.nn.Module) -> dict:
    """Everything analysis must not change: tensors (bitwise), parameter identity, modes, hooks, classes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "keys": list(model.state_dict().keys()),
        "param_ids": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        ],
        "dict_keys": sorted(model.__dict__),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["keys"] == after["keys"]
    for k, v in before["state"].items():  # bitwise, NaN included
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    for key in ("param_ids", "modes", "classes", "hooks", "dict_keys"):
        assert before[key] == after[key], key


def oracle_model(original: torch.nn.Module, converted: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the unconverted model whose replaced tensors are set to a*prev + b*next by hand."""
    import replace_wrap

    oracle = copy.deepcopy(original)
    rep = replace_wrap.report(converted)
    with torch.no_grad():
        for block in rep.replaced:
            site = converted.get_submodule(block.path).replacement
            a, b = site.coefficients()
            for k, rel in enumerate(site.tensor_names):
                i = site.index_of(k)
                prev = converted.get_parameter(f"{block.prev}.{rel}")
                nxt = converted.get_parameter(f"{block.next}.{rel}")
                target = oracle.get_parameter(f"{block.path}.{rel}")
                target.copy_(a[i] * prev + b[i] * nxt)
    return oracle
