"""Checkpoints written by replace_wrap 0.1 (before the package layout change) still load, and predict exactly."""

from __future__ import annotations

from pathlib import Path

import torch

import replace_wrap

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
        assert torch.equal(model(expected["x"]), expected["y"])


def test_a_0_1_save_pretrained_directory_loads_and_predicts_exactly():
    from transformers import ViTForImageClassification

    expected = torch.load(DATA / "hf_vit" / "expected.pt")
    model = replace_wrap.from_pretrained(ViTForImageClassification, DATA / "hf_vit").eval()
    assert [b.path for b in replace_wrap.report(model).replaced] == ["vit.layers.1"]
    with torch.no_grad():
        assert torch.equal(model(pixel_values=expected["x"]).logits, expected["y"])
