"""Train a converted timm ViT with DistributedDataParallel on CPU (gloo) on scikit-learn's digits.

Convert first, then wrap: every parameter of a converted model (the neighbours' tensors and the scalars ``a, b``)
takes part in each forward, so plain ``DistributedDataParallel(model)`` works, no ``find_unused_parameters``.

    python examples/ddp.py                                 # spawns 2 processes itself
    torchrun --nproc_per_node 2 examples/ddp.py            # or let torchrun start them
    python examples/ddp.py --steps 4 --out /tmp/ddp-check  # quick run; each rank saves its final state there
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import replace_wrap


def digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as (N, 3, S, S) images in [-1, 1] and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x.clamp(0, 1) - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(data.target, dtype=torch.long)


def build_model(image_size: int, depth: int) -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=4, depth=depth, num_classes=10
    )


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model(args.image_size, args.depth)
        replace_wrap.convert(model, every=2)
        ddp = DistributedDataParallel(model)  # no find_unused_parameters
        opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
        x, y = digits(args.image_size)
        g = torch.Generator().manual_seed(1)  # the same batches on every rank; each takes its own slice
        losses = []
        for step in range(args.steps):
            idx = torch.randint(0, len(y), (args.batch_size * world,), generator=g)[rank::world]
            loss = F.cross_entropy(ddp(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
        if rank == 0:
            print(replace_wrap.report(model))
        if args.out:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            torch.save({"state": state, "losses": losses}, Path(args.out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--out", default=None, help="directory where each rank saves its final state dict")
    args = p.parse_args(argv)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:  # started by torchrun
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.multiprocessing.spawn(train, args=(args.nproc, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
