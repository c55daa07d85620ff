"""FSDP2 on CPU/gloo, 2 processes: run by tests/test_distributed.py as a script (``python _fsdp_worker.py OUT``).

Each rank trains a converted toy sharded with ``replace_wrap.shard`` on the same batches, next to an unsharded
reference copy; it saves the full (gathered) final state of both, plus what naive per-block sharding raises.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import replace_wrap  # noqa: E402
from toys import ResidualMLP  # noqa: E402


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(model: torch.nn.Module, steps: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)  # the same batches on every rank and for the reference
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(8, 8, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def work(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        result: dict = {}
        for every in (2, 3):
            torch.manual_seed(0)
            model = replace_wrap.convert(ResidualMLP(depth=8), every=every)
            reference = copy.deepcopy(model)
            result[f"units_{every}"] = replace_wrap.fsdp_units(model)
            replace_wrap.shard(model, mesh=mesh)
            result[f"sharded_{every}"] = any(hasattr(p, "full_tensor") for p in model.parameters())
            result[f"losses_{every}"] = _train(model, steps=3)
            result[f"ref_losses_{every}"] = _train(reference, steps=3)
            result[f"state_{every}"] = {n: _full(p) for n, p in model.named_parameters()}
            result[f"ref_state_{every}"] = {n: _full(p) for n, p in reference.named_parameters()}
        # the naive recipe, one unit per block: the replaced block meets its neighbours' sharded tensors
        model = replace_wrap.convert(ResidualMLP(depth=8), every=2)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            _train(model, steps=1)
            result["naive_error"] = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test to check
            result["naive_error"] = f"{type(exc).__name__}: {exc}"
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.spawn(work, args=(2, sys.argv[1]), nprocs=2)
