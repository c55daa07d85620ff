"""Measuring a sharded training step on one rank: bytes communicated, unsharded parameters, per-rank shares.

Used by the distributed tests and ``replace-wrap bench --fsdp``; usable in any training loop::

    meter = FSDPMeter(model)
    with meter:
        loss = model(x).mean(); loss.backward()
    meter.gathered, meter.reduced, meter.peak_unsharded

:class:`FSDPMeter` is a ``TorchDispatchMode``: it sees every c10d collective that reaches the dispatcher (FSDP2's
and replace_wrap's all-gathers and reduce-scatters, on gloo and NCCL alike) and, before every operator,
samples the bytes of unsharded parameters alive on the rank: FSDP2's unsharded parameters plus the full
tensors replace_wrap gathered for replaced blocks. Sampling per operator makes it slow; measure a few steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import fsdp_collectives, fsdp_state

__all__ = ["FSDPMeter", "local_bytes"]


class FSDPMeter(TorchDispatchMode):
    """Counts collective bytes and the peak of unsharded parameter bytes while active (this rank only).

    Attributes:
        gathered: Bytes received by all-gathers (the unsharded size, FSDP's usual count).
        reduced: Bytes sent into reduce-scatters (the unsharded gradient size).
        all_reduced: Bytes of all-reduces.
        peak_unsharded: Highest bytes of unsharded parameters seen before any operator.
        calls: Number of collectives, by kind.
    """

    def __init__(self, model: nn.Module | None = None, sample: bool = True):
        super().__init__()
        self.model, self.sample = model, sample
        self.gathered = self.reduced = self.all_reduced = self.peak_unsharded = 0
        self.calls: dict[str, int] = {}

    def unsharded_now(self) -> int:
        """Bytes of unsharded parameters on this rank now."""
        return fsdp_state.unsharded_bytes(self.model) + fsdp_collectives.live_bytes()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.sample:
            self.peak_unsharded = max(self.peak_unsharded, self.unsharded_now())
        name = func.name()
        if name.startswith("c10d::"):
            self._count(name, args)
        out = func(*args, **kwargs)
        if self.sample:
            self.peak_unsharded = max(self.peak_unsharded, self.unsharded_now())
        return out

    def _count(self, name: str, args: tuple[Any, ...]) -> None:
        def nbytes(x: Any) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, (list, tuple)):
                return sum(nbytes(t) for t in x)
            return 0

        if "allgather" in name:
            kind, size = "all_gather", nbytes(args[0])
            self.gathered += size
        elif "reduce_scatter" in name:
            kind, size = "reduce_scatter", nbytes(args[1])
            self.reduced += size
        elif "allreduce" in name:
            kind, size = "all_reduce", nbytes(args[0])
            self.all_reduced += size
        else:
            kind = name.split("::")[1]
        self.calls[kind] = self.calls.get(kind, 0) + 1


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank stores of the model's parameters, gradients and optimizer state (local shards)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(model.parameters())
    out = {
        "params": sum(local(p).numel() * p.element_size() for p in params),
        "grads": sum(local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": 0,
    }
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    out["optimizer"] += local(v).numel() * v.element_size()
    return out
