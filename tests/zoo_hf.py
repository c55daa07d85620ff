"""The 20 HF vision models of the compatibility matrix, each built from a small config (no hub access).

Each builder returns a :class:`Case`: the model (a ``*ForImageClassification`` head where transformers has
one, so that a forward with ``labels`` returns ``.loss``), the keyword inputs for training (with labels) and
for evaluation (without). Sizes are the smallest that keep every stage and at least three blocks per stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

IMG = 32
N_LABELS = 3


@dataclass
class Case:
    model: nn.Module
    train_inputs: dict[str, Any]
    eval_inputs: dict[str, Any] = field(default_factory=dict)

    def call(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        return model(**inputs)


BUILDERS: dict[str, Callable[[], Case]] = {}


def register(name: str) -> Callable[[Callable[[], Case]], Callable[[], Case]]:
    def deco(fn: Callable[[], Case]) -> Callable[[], Case]:
        if name in BUILDERS:
            raise ValueError(f"HF builder {name!r} registered twice")
        BUILDERS[name] = fn
        return fn

    return deco


def _pixels(size: int = IMG, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _classify(model: nn.Module, size: int = IMG) -> Case:
    x = _pixels(size)
    return Case(model, {"pixel_values": x, "labels": torch.tensor([0, 1])}, {"pixel_values": x})


_VIT = dict(
    hidden_size=32, num_hidden_layers=5, num_attention_heads=2, intermediate_size=64, image_size=IMG,
    patch_size=8, num_labels=N_LABELS,
)


@register("ViT")
def vit() -> Case:
    import transformers as T

    return _classify(T.ViTForImageClassification(T.ViTConfig(**_VIT)))


@register("DeiT")
def deit() -> Case:
    import transformers as T

    return _classify(T.DeiTForImageClassification(T.DeiTConfig(**_VIT)))


@register("BEiT")
def beit() -> Case:
    import transformers as T

    cfg = T.BeitConfig(**_VIT, use_relative_position_bias=True, use_mean_pooling=True)
    return _classify(T.BeitForImageClassification(cfg))


@register("Data2VecVision")
def data2vec_vision() -> Case:
    import transformers as T

    cfg = T.Data2VecVisionConfig(**_VIT, use_relative_position_bias=True)
    return _classify(T.Data2VecVisionForImageClassification(cfg))


@register("Dinov2")
def dinov2() -> Case:
    import transformers as T

    cfg = T.Dinov2Config(
        hidden_size=32, num_hidden_layers=5, num_attention_heads=2, mlp_ratio=2, image_size=IMG, patch_size=8,
        num_labels=N_LABELS,
    )
    return _classify(T.Dinov2ForImageClassification(cfg))


@register("ViTMAE")
def vitmae() -> Case:
    import transformers as T

    cfg = T.ViTMAEConfig(
        **_VIT, decoder_hidden_size=32, decoder_num_hidden_layers=3, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, mask_ratio=0.5,
    )
    model = T.ViTMAEForPreTraining(cfg)
    x = _pixels()
    noise = torch.rand(2, (IMG // 8) ** 2)  # fixed masking, so eval outputs are comparable
    # pre-training: the loss is the pixel reconstruction loss (there are no labels)
    return Case(model, {"pixel_values": x, "noise": noise}, {"pixel_values": x, "noise": noise})


@register("YOLOS")
def yolos() -> Case:
    import transformers as T

    cfg = T.YolosConfig(**{**_VIT, "image_size": [IMG, IMG]}, num_detection_tokens=4)
    model = T.YolosForObjectDetection(cfg)
    x = _pixels()
    labels = [
        {"class_labels": torch.tensor([i % N_LABELS]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])} for i in range(2)
    ]
    return Case(model, {"pixel_values": x, "labels": labels}, {"pixel_values": x})


@register("Swin")
def swin() -> Case:
    import transformers as T

    cfg = T.SwinConfig(
        image_size=IMG, patch_size=2, embed_dim=16, depths=[2, 4], num_heads=[2, 4], window_size=4,
        num_labels=N_LABELS,
    )
    return _classify(T.SwinForImageClassification(cfg))


@register("Swinv2")
def swinv2() -> Case:
    import transformers as T

    cfg = T.Swinv2Config(
        image_size=IMG, patch_size=2, embed_dim=16, depths=[2, 4], num_heads=[2, 4], window_size=4,
        num_labels=N_LABELS,
    )
    return _classify(T.Swinv2ForImageClassification(cfg))


@register("ConvNext")
def convnext() -> Case:
    import transformers as T

    cfg = T.ConvNextConfig(hidden_sizes=[8, 16, 32], depths=[2, 2, 2], num_stages=3, num_labels=N_LABELS)
    return _classify(T.ConvNextForImageClassification(cfg))


@register("ConvNextV2")
def convnextv2() -> Case:
    import transformers as T

    cfg = T.ConvNextV2Config(hidden_sizes=[8, 16, 32], depths=[2, 2, 2], num_stages=3, num_labels=N_LABELS)
    return _classify(T.ConvNextV2ForImageClassification(cfg))


@register("ResNet")
def resnet() -> Case:
    import transformers as T

    cfg = T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 2, 1], layer_type="basic", num_labels=N_LABELS
    )
    return _classify(T.ResNetForImageClassification(cfg))


@register("RegNet")
def regnet() -> Case:
    import transformers as T

    cfg = T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 2, 1], groups_width=8, num_labels=N_LABELS)
    return _classify(T.RegNetForImageClassification(cfg))


@register("MobileViT")
def mobilevit() -> Case:
    import transformers as T

    cfg = T.MobileViTConfig(
        image_size=IMG, patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
        num_attention_heads=2, num_labels=N_LABELS,
    )
    return _classify(T.MobileViTForImageClassification(cfg))


@register("SegFormer")
def segformer() -> Case:
    import transformers as T

    cfg = T.SegformerConfig(
        num_encoder_blocks=2, depths=[2, 3], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=N_LABELS,
    )
    return _classify(T.SegformerForImageClassification(cfg))


@register("PvtV2")
def pvt_v2() -> Case:
    import transformers as T

    cfg = T.PvtV2Config(
        image_size=IMG, num_encoder_blocks=2, depths=[2, 3], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=N_LABELS,
    )
    return _classify(T.PvtV2ForImageClassification(cfg))


@register("EfficientNet")
def efficientnet() -> Case:
    import transformers as T

    cfg = T.EfficientNetConfig(
        image_size=IMG, width_coefficient=0.25, depth_coefficient=1.0, hidden_dim=320, dropout_rate=0.0,
        drop_connect_rate=0.0, num_labels=N_LABELS,
    )
    return _classify(T.EfficientNetForImageClassification(cfg))


@register("Hiera")
def hiera() -> Case:
    import transformers as T

    cfg = T.HieraConfig(
        embed_dim=8, image_size=[64, 64], depths=[1, 2, 2, 1], num_heads=[1, 1, 2, 2], num_query_pool=2,
        num_labels=N_LABELS,
    )
    return _classify(T.HieraForImageClassification(cfg), size=64)


def _text() -> dict[str, Any]:
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)


@register("CLIPVision")
def clip_vision() -> Case:
    import transformers as T

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2, image_size=IMG,
        patch_size=8,
    )
    cfg = T.CLIPConfig(vision_config=vision, text_config=_text(), num_labels=N_LABELS)
    return _classify(T.CLIPForImageClassification(cfg))


@register("SiglipVision")
def siglip_vision() -> Case:
    import transformers as T

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2, image_size=IMG,
        patch_size=8,
    )
    cfg = T.SiglipConfig(vision_config=vision, text_config=_text(), num_labels=N_LABELS)
    return _classify(T.SiglipForImageClassification(cfg))
