"""Train a converted timm model on CIFAR-10 with the real torchvision loader (``--fake-data`` runs offline).

The first run downloads CIFAR-10 (170 MB) to ``--data-dir``. ``--fake-data`` swaps in torchvision's
``FakeData`` with CIFAR-10's shapes, so the whole pipeline (augmentation, DataLoader workers, training,
evaluation, merge, save) runs without a network, e.g. in tests. ``--no-convert`` trains the same model
end-to-end, for comparison.

    python examples/cifar10.py --data-dir ~/data --epochs 30
    python examples/cifar10.py --data-dir ~/data --epochs 30 --no-convert
    python examples/cifar10.py --fake-data --limit 256 --epochs 1
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

import replace_wrap

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar10(data_dir: str, fake: bool, download: bool, limit: int | None):
    """(train, test) datasets: the real CIFAR-10, or FakeData of the same shapes."""
    train_tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    if fake:
        n = limit or 1024
        train = datasets.FakeData(n, (3, 32, 32), 10, transform=train_tf, random_offset=0)
        test = datasets.FakeData(max(1, n // 4), (3, 32, 32), 10, transform=test_tf, random_offset=n)
    else:
        try:
            train = datasets.CIFAR10(data_dir, train=True, transform=train_tf, download=download)
            test = datasets.CIFAR10(data_dir, train=False, transform=test_tf, download=download)
        except (RuntimeError, OSError) as exc:  # not downloaded yet, or no network
            raise SystemExit(
                f"CIFAR-10 is not available in {data_dir!r} ({exc}). Run without --no-download on a machine "
                "with network access, or pass --fake-data for an offline run."
            ) from exc
    if limit:
        train, test = Subset(train, range(min(limit, len(train)))), Subset(test, range(min(limit, len(test))))
    return train, test


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="./data")
    p.add_argument(
        "--fake-data", action="store_true", help="torchvision FakeData instead of CIFAR-10 (offline)"
    )
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    p.add_argument(
        "--model", default="vit_tiny_patch16_224", help="a timm model name (built without weights)"
    )
    p.add_argument("--patch-size", type=int, default=4, help="patch size for ViT-family models")
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--no-convert", action="store_true", help="train end-to-end (the baseline)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="use only the first N train and test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write the merged model's state_dict here")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train, test = cifar10(args.data_dir, args.fake_data, not args.no_download, args.limit)
    train_loader = DataLoader(
        train,
        args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    test_loader = DataLoader(test, 2 * args.batch_size, num_workers=args.workers)
    if not len(train_loader):
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(train)} training images")
    try:  # ViT-family models take the input and patch size; convolutional ones refuse them
        model = timm.create_model(
            args.model, pretrained=False, num_classes=10, img_size=32, patch_size=args.patch_size
        )
    except TypeError:
        model = timm.create_model(args.model, pretrained=False, num_classes=10)

    total_params = sum(p.numel() for p in model.parameters())
    if not args.no_convert:
        replace_wrap.convert(model, every=args.every)
        print(replace_wrap.report(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"{args.model}: {sum(p.numel() for p in trainable):,} of {total_params:,} parameters trainable")

    # No weight decay on 1-d tensors: biases, norms and the replaced blocks' scalars a, b.
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
    )
    steps = args.epochs * len(train_loader)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    for epoch in range(args.epochs):
        model.train()
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        elapsed = time.perf_counter() - start
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.3f}, test accuracy "
            f"{evaluate(model, test_loader):.3f}, {seen / elapsed:.0f} images/s"
        )

    if not args.no_convert:
        print(replace_wrap.report(model).summary())
        replace_wrap.merge(model)  # a plain timm model again: save it, load it anywhere without replace_wrap
        print(
            f"merged: test accuracy {evaluate(model, test_loader):.3f}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters"
        )
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save)
        print(f"saved the state_dict to {args.save}")


if __name__ == "__main__":
    main()
