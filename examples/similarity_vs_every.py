"""Fine-tuning a pretrained model: convert with Every(2) or with Similarity, and compare where each starts.

Trains a small timm ViT (built from a config, no download) on scikit-learn's digits end-to-end -- the
"pretrained" model -- then converts two copies of it, one with ``Every(2)`` and one with ``Similarity(every=2)``
(same number of replaced blocks, so the same trainable-parameter count), and reports test loss and accuracy
right after the conversion and after a short fine-tune of each.

    bash .ci/venv python examples/similarity_vs_every.py            # the numbers in docs/policies.md
    bash .ci/venv python examples/similarity_vs_every.py --small    # a seconds-long smoke run (the tests)

Deterministic for a given ``--seed`` (one thread, seeded data split and initialisation).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

import replace_wrap


def load_digits_split(seed: int, limit: int | None = None) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], split 80/20 with a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # shape: (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        perm = perm[:limit]
    cut = int(0.8 * len(perm))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def make_vit(depth: int, width: int, seed: int) -> nn.Module:
    """A small timm VisionTransformer for 8x8 single-channel images (2x2 patches: 16 tokens + class token)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1, num_classes=10,
        embed_dim=width, depth=depth, num_heads=4, mlp_ratio=2.0,
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, batch: int = 64):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = max(1, epochs * ((len(x) + batch - 1) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = model(x)
    return {
        "loss": nn.functional.cross_entropy(logits, y).item(),
        "acc": (logits.argmax(1) == y).float().mean().item(),
    }


def run(
    seed: int = 0, depth: int = 6, width: int = 64, epochs: int = 40, finetune_epochs: int = 3,
    limit: int | None = None, scalars: str = "block",
) -> dict:
    """Pretrain, convert with both policies, fine-tune; return every number."""
    torch.set_num_threads(1)  # determinism, and tiny models run fastest on one thread
    xtr, ytr, xte, yte = load_digits_split(seed, limit)
    t0 = time.perf_counter()
    pretrained = make_vit(depth, width, seed)
    train(pretrained, xtr, ytr, epochs, lr=2e-3, seed=seed)
    out: dict = {
        "config": {"seed": seed, "depth": depth, "width": width, "epochs": epochs, "scalars": scalars,
                   "finetune_epochs": finetune_epochs, "train": len(xtr), "test": len(xte)},
        "pretrained": evaluate(pretrained, xte, yte) | {"seconds": time.perf_counter() - t0},
    }
    for name, policy in (("Every(2)", replace_wrap.Every(2)), ("Similarity(every=2)", replace_wrap.Similarity(every=2))):
        model = replace_wrap.convert(copy.deepcopy(pretrained), policy=policy, scalars=scalars)
        rep = replace_wrap.report(model)
        row = {
            "replaced": [b.path for b in rep.replaced],
            "scalars": {  # the first set of each block
                b.path: [round(b.scalars["a"][0], 4), round(b.scalars["b"][0], 4)] for b in rep.replaced
            },
            "trainable": rep.trainable_after,
            "trainable_before": rep.trainable_before,
            "after_convert": evaluate(model, xte, yte),
        }
        train(model, xtr, ytr, finetune_epochs, lr=5e-4, seed=seed + 1)
        row["after_finetune"] = evaluate(model, xte, yte)
        out[name] = row
    out["seconds"] = time.perf_counter() - t0
    return out


def table(result: dict) -> str:
    pre = result["pretrained"]
    lines = [
        f"pretrained ViT (depth {result['config']['depth']}, width {result['config']['width']}): "
        f"test loss {pre['loss']:.4f}, accuracy {100 * pre['acc']:.2f}%",
        "",
        "| policy | replaced blocks | trainable | loss after convert | acc after convert "
        "| loss after fine-tune | acc after fine-tune |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("Every(2)", "Similarity(every=2)"):
        r = result[name]
        lines.append(
            f"| `{name}` | {', '.join(r['replaced'])} | {r['trainable']:,} of {r['trainable_before']:,} "
            f"| {r['after_convert']['loss']:.4f} | {100 * r['after_convert']['acc']:.2f}% "
            f"| {r['after_finetune']['loss']:.4f} | {100 * r['after_finetune']['acc']:.2f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=40, help="pretraining epochs")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--scalars", choices=("block", "tensor"), default="block", help="ReplaceConfig.scalars")
    ap.add_argument("--small", action="store_true", help="a few seconds: 200 images, 2+1 epochs, width 32")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if args.small:
        result = run(args.seed, depth=5, width=32, epochs=2, finetune_epochs=1, limit=200, scalars=args.scalars)
    else:
        result = run(args.seed, args.depth, args.width, args.epochs, args.finetune_epochs, scalars=args.scalars)
    print(table(result))
    print(f"\n(total {result['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
