"""Checkpoints written by replace_wrap 0.1 (before the package layout change) still load, and predict exactly.

The expected outputs were computed by 0.1 on another machine: CPUs whose matrix kernels differ (vector widths)
round differently, so they are compared to float32 rounding. On this machine the loaded model must predict
bitwise what the plain model of its merged tensors predicts.
"""

from __future__ import annotations

from pathlib import Path

import copy

import torch

import replace_wrap

ROUNDING = {"rtol": 1e-5, "atol": 1e-6}  # float32 rounding of a few layers: a wrong tensor moves outputs ~1e-2

DATA = Path(__file__).resolve().parent / "data" / "checkpoint_0_1"


def test_a_0_1_save_directory_loads_and_predicts_exactly():
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            *[torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6)) for _ in range(5)]
        )

    expected = torch.load(DATA / "sequential" / "expected.pt")
    model = replace_wrap.load(make(), DATA / "sequential")
    assert [b.path for b in replace_wrap.report(model).replaced] == ["1", "3"]
    assert replace_wrap.report(model).config.scalars == "tensor"
    with torch.no_grad():
        y = model(expected["x"])
        torch.testing.assert_close(y, expected["y"], **ROUNDING)
        assert torch.equal(replace_wrap.merge(copy.deepcopy(model))(expected["x"]), y)


def test_a_0_1_save_pretrained_directory_loads_and_predicts_exactly():
    from transformers import ViTForImageClassification

    expected = torch.load(DATA / "hf_vit" / "expected.pt")
    model = replace_wrap.from_pretrained(ViTForImageClassification, DATA / "hf_vit").eval()
    assert [b.path for b in replace_wrap.report(model).replaced] == ["vit.layers.1"]
    with torch.no_grad():
        y = model(pixel_values=expected["x"]).logits
        torch.testing.assert_close(y, expected["y"], **ROUNDING)
        assert torch.equal(replace_wrap.merge(copy.deepcopy(model))(pixel_values=expected["x"]).logits, y)
