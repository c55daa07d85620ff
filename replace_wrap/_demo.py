"""The demo behind ``replace-wrap demo``: convert a timm ViT and an HF ViT, show the reports, merge back."""

from __future__ import annotations

import torch

from . import api

__all__ = ["run_demo"]


def run_demo(every: int = 2) -> int:
    """Convert two small ViTs built from configs (no downloads), train one step, merge, and print reports."""
    torch.manual_seed(0)
    models = []
    try:
        import timm

        models.append(("timm vit_small_patch16_224 (64 px)", timm.create_model(
            "vit_small_patch16_224", pretrained=False, img_size=64, num_classes=10), 64))
    except ImportError:
        print("timm is not installed: skipping the timm model")
    try:
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(image_size=64, patch_size=16, hidden_size=192, num_hidden_layers=12,
                        num_attention_heads=3, intermediate_size=768, num_labels=10)
        models.append(("HF ViTForImageClassification (ViT-Tiny shape, 64 px)", ViTForImageClassification(cfg), 64))
    except ImportError:
        print("transformers is not installed: skipping the HF model")
    for title, model, size in models:
        print(f"\n== {title}")
        x = torch.randn(4, 3, size, size)
        model.eval()
        with torch.no_grad():
            before = _logits(model(x))
        api.convert(model, every=every)
        print(api.report(model))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loss = _logits(model(x)).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            converted = _logits(model(x))
            api.merge(model)
            merged = _logits(model(x))
        print(f"after one training step: merged vs converted max |diff| = {(merged - converted).abs().max():.2e}; "
              f"changed vs original by {(converted - before).abs().max():.3f}")
    return 0


def _logits(y: object) -> torch.Tensor:
    return y if isinstance(y, torch.Tensor) else y.logits  # type: ignore[attr-defined]
