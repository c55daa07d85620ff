"""Train a converted model with Hugging Face Accelerate: ``Accelerator.prepare``, DDP on CPU processes.

Convert first, then prepare: every parameter of a converted model takes part in each forward, so Accelerate's
DDP wrapper needs no ``find_unused_parameters``. ``accelerator.save_state`` / ``load_state`` checkpoint and
resume it (the state dict carries the scalars), and ``accelerator.get_state_dict(model)`` is also a plain
checkpoint of the original architecture (the replaced tensors' synthesized values are in it).

    python examples/accelerate_ddp.py                                             # one process
    torchrun --nproc_per_node 2 examples/accelerate_ddp.py                        # DDP, 2 CPU processes
    python examples/accelerate_ddp.py --steps 6 --out /tmp/acc                    # save states to compare

With ``--out`` the run saves its state with ``accelerator.save_state`` half-way, then loads it back into
weights moved elsewhere and trains the second half again; each rank saves both final state dicts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

import replace_wrap


def build(depth: int = 6, width: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(depth)]
    return replace_wrap.convert(nn.Sequential(nn.Linear(64, width), *blocks, nn.Linear(width, 10)), every=2)


def batches(steps: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        out.append((x[idx], y[idx]))
    return out


def train(accelerator: Accelerator, model: nn.Module, opt: torch.optim.Optimizer, data: list) -> list[float]:
    losses = []
    world, rank = accelerator.num_processes, accelerator.process_index
    for x, y in data:
        x, y = x[rank::world].to(accelerator.device), y[rank::world].to(accelerator.device)  # this rank's share
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    data = batches(args.steps, args.batch_size)

    half = args.steps // 2 if args.out else args.steps
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, opt = accelerator.prepare(model, opt)
    losses = train(accelerator, model, opt, data[:half])
    if args.out:
        accelerator.save_state(Path(args.out) / "state")  # model (scalars included), optimizer, RNG states
        losses += train(accelerator, model, opt, data[half:])
    final = {k: v.detach().clone() for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        print(f"{accelerator.distributed_type} on {accelerator.num_processes} process(es); loss "
              f"{losses[0]:.3f} -> {losses[-1]:.3f}")
        print("scalars:", replace_wrap.scalars(accelerator.unwrap_model(model)))
    result = {"distributed_type": str(accelerator.distributed_type), "world": accelerator.num_processes,
              "losses": losses}
    if args.out:
        # resume: move every weight (scalars included) elsewhere, load_state, train the second half again
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        accelerator.load_state(Path(args.out) / "state")
        train(accelerator, model, opt, data[half:])
        resumed = accelerator.get_state_dict(model)
        rank = accelerator.process_index
        torch.save({"final": final, "resumed": resumed}, Path(args.out) / f"rank{rank}.pt")
        (Path(args.out) / f"result{rank}.json").write_text(json.dumps(result))
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
