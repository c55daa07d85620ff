"""Seeded toy models covering the kinds of stacks replace_wrap must handle."""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """An MLP of residual blocks in a ModuleList, with an input projection and a head."""

    def __init__(self, depth: int = 6, width: int = 16, n_in: int = 8, n_out: int = 4):
        super().__init__()
        self.proj = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        x = self.proj(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)

    @staticmethod
    def example(batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 8)


class ConvBNBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ConvNet(nn.Module):
    """A small CNN: stem, a Sequential of conv+BatchNorm residual blocks, pooled head."""

    def __init__(self, depth: int = 5, ch: int = 8, n_out: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.layers = nn.Sequential(*[ConvBNBlock(ch) for _ in range(depth)])
        self.head = nn.Linear(ch, n_out)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))

    @staticmethod
    def example(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, 8, 8)


class TinyTransformer(nn.Module):
    """Token embedding + nn.TransformerEncoderLayer blocks registered as plain attributes (no container)."""

    def __init__(self, depth: int = 5, width: int = 16, vocab: int = 11):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.depth = depth
        for i in range(depth):
            layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
            setattr(self, f"layer{i}", layer)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for i in range(self.depth):
            x = getattr(self, f"layer{i}")(x)
        return self.out(x)

    @staticmethod
    def example(batch: int = 2) -> torch.Tensor:
        return torch.randint(0, 11, (batch, 6))


class SharedSubmoduleNet(nn.Module):
    """Sibling blocks that share one module (like timm's CoaT shares its conv position encoding)."""

    def __init__(self, depth: int = 5, width: int = 8):
        super().__init__()
        self.shared = nn.Linear(width, width)
        self.blocks = nn.ModuleList(SharingBlock(width, self.shared) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x

    @staticmethod
    def example(batch: int = 3) -> torch.Tensor:
        return torch.randn(batch, 8)


class SharingBlock(nn.Module):
    def __init__(self, width: int, shared: nn.Module):
        super().__init__()
        self.pos = shared
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x + self.pos(x)))


class StageBlock(nn.Module):
    """A residual conv block; a stage's first block may change width and stride, with a 1x1 projection."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel, padding=kernel // 2)
        self.proj = nn.Conv2d(c_in, c_out, 1, stride=stride) if (c_in != c_out or stride != 1) else None

    def forward(self, x):
        skip = x if self.proj is None else self.proj(x)
        return torch.relu(skip + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class StagedCNN(nn.Module):
    """Three stages (width 4 -> 8 -> 6, kernel 3 -> 3 -> 5) of two blocks each, chained into one stack.

    The stage-first blocks are strided and carry a projection their neighbours may lack, so ``every=2``
    replaces blocks whose neighbours differ in channels (slice / zero-pad) and kernel size (centre crop/pad).
    """

    def __init__(self, n_out: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        spec = [(4, 4, 1, 3), (4, 4, 1, 3), (4, 8, 2, 3), (8, 8, 1, 3), (8, 6, 2, 5), (6, 6, 1, 5)]
        self.stages = nn.ModuleList(
            nn.Sequential(*(StageBlock(*spec[j]) for j in range(i, i + 2))) for i in range(0, len(spec), 2)
        )
        self.head = nn.Linear(6, n_out)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))

    @staticmethod
    def example(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, 12, 12)


def tiny_hf_vit(depth: int = 5) -> nn.Module:
    """An HF ``ViTForImageClassification`` small enough for the CPU (16 px, 3 labels, no dropout)."""
    import pytest

    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(cfg)


def tiny_timm_vit(depth: int = 5) -> nn.Module:
    """A timm ViT-Ti with ``depth`` blocks at 16 px (3 classes)."""
    import pytest

    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=depth, num_classes=3
    )


def logits(y):
    """The logits of a plain tensor output or of an HF output object."""
    return y.logits if hasattr(y, "logits") else y
