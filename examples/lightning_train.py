"""Train a converted model with Lightning, checkpoint, resume, and log every replaced block's a, b.

A ``LightningModule`` holds a converted residual MLP (scikit-learn digits); the Trainer is unchanged. Its
checkpoints hold the LightningModule's state dict, which a converted model fills with its scalars and (for
plain loaders) the synthesized values of its replaced tensors; resuming loads them back exactly.
``replace_wrap.integrations.lightning.ScalarsCallback`` logs ``replace_wrap/<block>/a`` and ``.../b`` to the
Trainer's logger (a CSV file here).

    python examples/lightning_train.py                                   # one CPU process
    python examples/lightning_train.py --devices 2 --strategy ddp        # DDP, 2 CPU processes (gloo)
    python examples/lightning_train.py --epochs 2 --out /tmp/lit         # also: resume from epoch 1, compare

With ``--out`` the script trains ``--epochs`` epochs, then trains again from the checkpoint of the first
epoch, and saves both final state dicts (``continuous.pt``, ``resumed.pt``; one per rank under DDP) and the
logged metrics (``metrics.csv``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import replace_wrap
from replace_wrap.integrations.lightning import ScalarsCallback


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def build(depth: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), *[Block(width) for _ in range(depth)], nn.Linear(width, 10))


class Classifier(L.LightningModule):
    """A converted model inside a LightningModule: convert in ``__init__``, so checkpoints reload into it."""

    def __init__(self, depth: int = 6, width: int = 32, every: int = 2, lr: float = 3e-3, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.model = replace_wrap.convert(build(depth, width), every=every)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    # The default scalar-gradient estimator draws its sample from torch's generator, as dropout does. Lightning
    # checkpoints do not hold the generator's state; these two hooks add it, so a resumed run draws the very
    # samples the uninterrupted run drew (without them it continues with other, equally unbiased samples).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


def digits(limit: int) -> torch.utils.data.DataLoader:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:limit], dtype=torch.float32) / 16.0
    y = torch.tensor(data.target[:limit], dtype=torch.long)
    # no shuffling: a resumed run sees the same batches as an uninterrupted one
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=False)


def fit(args: argparse.Namespace, root: Path, ckpt_path: str | None = None) -> tuple[L.Trainer, Classifier]:
    # the resumed run starts from other weights: only a complete restore can make it end where the other did
    module = Classifier(depth=args.depth, every=args.every, seed=0 if ckpt_path is None else 1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=args.epochs,
        logger=CSVLogger(root, name="logs"),
        callbacks=[ScalarsCallback(), ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, digits(args.limit), ckpt_path=ckpt_path)
    return trainer, module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--limit", type=int, default=1797, help="training samples (digits has 1797)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help='"auto", or "ddp" with --devices 2')
    parser.add_argument("--out", default=None, help="train, resume from epoch 1, save both final states here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.out or "lightning_logs_replace_wrap")
    trainer, module = fit(args, root / "continuous")
    rank = trainer.global_rank
    if rank == 0:
        print(replace_wrap.report(module.model).summary())
        print("scalars:", replace_wrap.scalars(module.model))
    result = {"rank": rank, "world": trainer.world_size}
    if args.out:
        first = sorted((root / "continuous" / "ckpt").glob("epoch=0-*.ckpt"))[0]
        _, resumed = fit(args, root / "resumed", ckpt_path=str(first))
        suffix = f"_rank{rank}" if trainer.world_size > 1 else ""
        torch.save(module.state_dict(), root / f"continuous{suffix}.pt")
        torch.save(resumed.state_dict(), root / f"resumed{suffix}.pt")
        metrics = Path(trainer.logger.log_dir) / "metrics.csv"
        result["metrics"] = str(metrics)
        (root / f"result{suffix}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    main()
