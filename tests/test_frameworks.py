"""The converted object keeps its framework API: HF config/ModelOutput/save_pretrained, timm checkpointing."""

from __future__ import annotations

import pytest
import torch

import replace_wrap


def test_hf_vit_keeps_its_api(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=8, num_labels=3,
    )
    model = transformers.ViTForImageClassification(cfg)
    replace_wrap.convert(model, every=2)
    assert isinstance(model, transformers.ViTForImageClassification)
    assert model.config is cfg
    out = model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2]))
    assert isinstance(out, transformers.modeling_outputs.ImageClassifierOutput)
    assert out.loss.ndim == 0 and out.logits.shape == (2, 3)
    out.loss.backward()
    model.save_pretrained(tmp_path)  # must not fail (round-trip loading is the persistence layer's job)
    assert (tmp_path / "config.json").is_file()


def test_timm_set_grad_checkpointing_after_convert():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4)
    replace_wrap.convert(model, every=2)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        y = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    out = model(x)
    out.square().mean().backward()
    assert model.blocks[1].replacement.a.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)
