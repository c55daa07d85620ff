"""Convert a timm model and train it with a plain PyTorch loop, then merge it back into a plain timm model.

The loop is the one you already have: replace_wrap changes the model in place (same object, class and
forward), so the optimizer simply receives fewer trainable parameters. Data: scikit-learn's bundled digits
(offline), upsampled to ``--img-size`` and repeated to 3 channels.

    python examples/timm_train_loop.py                                   # vit_tiny at 32 px, patch 8
    python examples/timm_train_loop.py --model resnet34 --epochs 3
    python examples/timm_train_loop.py --model deit_small_patch16_224 --model-arg patch_size=8 --every 3
"""

from __future__ import annotations

import argparse
import ast
import time

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import replace_wrap


def digits(img_size: int, limit: int | None) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): digits as (n, 3, img_size, img_size) in [-1, 1]."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # (n, 1, 8, 8)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).expand(
        -1, 3, -1, -1
    )
    y = torch.tensor(d.target)
    tr, te = train_test_split(list(range(len(y))), test_size=0.25, stratify=d.target, random_state=0)
    tr, te = tr[:limit], te[:limit]
    return x[tr].contiguous(), y[tr], x[te].contiguous(), y[te]


def create(name: str, img_size: int, extra: dict) -> torch.nn.Module:
    """A timm model from its config (random init, no download)."""
    try:  # models with a fixed input size (ViTs, Swin, ...) need img_size; convolutional ones refuse it
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=img_size, **extra)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=10, **extra)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="vit_tiny_patch16_224", help="a timm model name (built without weights)"
    )
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra timm.create_model argument, e.g. patch_size=8 (repeatable)",
    )
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--every", type=int, default=2, help="replace every k-th block of each stack")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=None, help="use only the first N train and test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write the merged model's state_dict here (torch.save)")
    args = p.parse_args(argv)
    extra = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in args.model_arg)}
    if "patch_size" not in extra and args.model.startswith(("vit_", "deit_")):
        extra["patch_size"] = 8  # 16 px patches would leave a 32 px image with 4 tokens

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits(args.img_size, args.limit)
    model = create(args.model, args.img_size, extra)

    # --8<-- [start:convert]
    before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    replace_wrap.convert(model, every=args.every)  # in place: same object, class and forward
    print(replace_wrap.report(model))
    after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {before:,} -> {after:,} ({after / before:.2f}x)")
    # --8<-- [end:convert]

    # --8<-- [start:loop]
    # An ordinary loop: the optimizer sees the kept blocks' tensors and the replaced blocks' scalars a, b.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        start, losses = time.perf_counter(), []
        for batch in torch.randperm(len(y_train), generator=order).split(args.batch_size):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(
            f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.3f}, "
            f"test accuracy {accuracy(model, x_test, y_test):.3f} ({time.perf_counter() - start:.1f} s)"
        )
    # --8<-- [end:loop]

    # --8<-- [start:merge]
    print(replace_wrap.report(model).summary())  # the scalars' trained values are in the table above
    converted_acc = accuracy(model, x_test, y_test)
    with torch.no_grad():
        converted_logits = model(x_test)
        replace_wrap.merge(model)  # a plain timm model of the original architecture again
        merged_logits = model(x_test)
    print(
        f"merged: {sum(p.numel() for p in model.parameters()):,} parameters, all trainable; "
        f"max |merged - converted| = {(merged_logits - converted_logits).abs().max().item():.1e}; "
        f"test accuracy {accuracy(model, x_test, y_test):.3f} (converted {converted_acc:.3f})"
    )
    # --8<-- [end:merge]
    if args.save:
        torch.save(model.state_dict(), args.save)
        print(
            f"saved the merged state_dict to {args.save}: load it into timm.create_model({args.model!r}, ...)"
        )


if __name__ == "__main__":
    main()
