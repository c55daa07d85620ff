"""Does the sampled scalar gradient cost accuracy? Train a small timm ViT on scikit-learn's digits.

Variants: end-to-end, freeze (the blocks ``every=2`` would replace), replace with the generic autograd path,
replace with the exact fast path, replace with the sampled estimator (``ab_grad_sample``), and the lean mode.
Each runs for several seeds; the table gives the mean and standard deviation of the test accuracy.

    bash .ci/venv python examples/bench_digits_accuracy.py --seeds 3 --epochs 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import replace_wrap

VARIANTS = {
    "end-to-end": None,
    "freeze": "freeze",
    "replace-generic": {"fast_path": False},
    "replace": {},
    "replace-sampled": {"ab_grad_sample": 1 / 16},
    "replace-lean": {"ab_grad_sample": 1 / 16, "recompute": True},
}


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The 8x8 digits as (3, 8, 8) images scaled to [-1, 1], split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 8.0 - 1.0  # pixel values are 0..16
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def make_model(seed: int, depth: int = 8) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=2, embed_dim=96, depth=depth, num_heads=4, num_classes=10)


def train(variant: str, seed: int, epochs: int, batch: int = 64, lr: float = 1e-3, limit: int | None = None) -> float:
    """Train one variant from one seed; returns the test accuracy."""
    xtr, ytr, xte, yte = digits()
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
    model = make_model(seed)
    how = VARIANTS[variant]
    if how == "freeze":
        for b in replace_wrap.plan(model, every=2).replaced:
            for rel in b.fused:
                model.get_parameter(f"{b.path}.{rel}").requires_grad_(False)
    elif how is not None:
        replace_wrap.convert(model, every=2, **how)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * ((len(ytr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout-free model; this seeds the sampled rows
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr), generator=g).split(batch):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if how not in (None, "freeze"):
        replace_wrap.merge(model)  # what is deployed; equal to the converted model's outputs
    model.eval()
    with torch.no_grad():
        return (model(xte).argmax(-1) == yte).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v for v in args.variants.split(",") if v]
    acc: dict[str, list[float]] = {v: [] for v in names}
    secs: dict[str, float] = {v: 0.0 for v in names}
    for seed in range(args.seeds):
        for v in names:  # interleaved, like the speed benchmark
            t0 = time.perf_counter()
            acc[v].append(train(v, seed, args.epochs))
            secs[v] += time.perf_counter() - t0
            print(f"seed {seed} {v}: {acc[v][-1]:.4f}", file=sys.stderr)
    print(f"digits, ViT depth 8 width 96 on 8x8 images (patch 2), every=2, {args.epochs} epochs, "
          f"{args.seeds} seeds")
    print("\n| variant | test accuracy mean | std | per seed | train s / run |\n|---|---:|---:|---|---:|")
    for v in names:
        sd = statistics.stdev(acc[v]) if len(acc[v]) > 1 else 0.0
        per = ", ".join(f"{a:.4f}" for a in acc[v])
        print(f"| {v} | {statistics.mean(acc[v]):.4f} | {sd:.4f} | {per} | {secs[v] / len(acc[v]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
