"""The collectives of the sharded synthesis, as autograd Functions, and the lifetime of what they gather.

:class:`Gather` all-gathers several dim-0 sharded tensors in one collective, with FSDP2's layout (``torch.chunk``
rows per rank, every rank's chunk padded to the first one's), and reduce-scatters their gradients in one
collective in its backward. The full tensors it returns can be freed after the forward and filled again
before the backward (:meth:`Gather.free`, :meth:`Gather.regather`): FSDP2's own trick for unsharded
parameters, which resizes the storage of the tensors autograd saved instead of dropping them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import fsdp_state

__all__ = [
    "Computed", "Gather", "GatherShards", "ScaleGrad", "all_gather_flat", "in_backward", "live_bytes",
    "saved_tensor_hooks_active",
]

_OWNERS: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()  # every full tensor gathered here (for live_bytes)


def live_bytes() -> int:
    """Bytes of full (unsharded) tensors gathered by replace_wrap that are allocated now, on this rank."""
    return sum(t.untyped_storage().nbytes() for t in list(_OWNERS))


def in_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread (e.g. a checkpoint's recomputation)."""
    return torch._C._current_graph_task_id() != -1


def saved_tensor_hooks_active() -> bool:
    """Whether saved tensors are packed by hooks (activation checkpointing, offloading) rather than kept."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _tracked() -> bool:
    # Autograd keeps what this forward saves: freeing the full tensors after the forward saves memory.
    return torch.is_grad_enabled() and not in_backward() and not saved_tensor_hooks_active()


class _Releasable:
    """Full tensors (:attr:`owners`, each its own storage) released after the forward, refilled before the backward."""

    owners: list[torch.Tensor]

    def free(self) -> None:
        """Release the full tensors' memory; autograd keeps the (now empty) tensor objects."""
        for o in self.owners:
            o.untyped_storage().resize_(0)

    def regather(self) -> None:
        """Refill the freed full tensors (when the gradient reaches the block, before the backward needs them)."""
        if not self.owners or self.owners[0].untyped_storage().nbytes():
            return
        for o in self.owners:
            o.untyped_storage().resize_(o.numel() * o.element_size())
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tuple(self.owners)):
            self._refill()

    def _refill(self) -> None:
        raise NotImplementedError


class Gather(_Releasable):
    """One all-gather of several dim-0 sharded tensors, its reduce-scatter, and the storage of the result.

    Args:
        shapes: Global shapes of the tensors.
        group: The process group that shards dim 0.
        replicate_groups: HSDP: the groups whose ranks hold the same shards of different data (all-reduced).
        dtype: Dtype of the all-gather (the unit's ``param_dtype``).
        reduce_dtype: Dtype of the reduce-scatter (``None``: the gradient's).
        divide: The gradients' sum is divided by this (FSDP's gradient divide factor).
        recompute: Returns the local shards again (no autograd), to refill the storage for the backward.
    """

    def __init__(
        self,
        shapes: list[torch.Size],
        group: Any,
        replicate_groups: list[Any],
        dtype: torch.dtype,
        reduce_dtype: torch.dtype | None,
        divide: float,
        recompute: Callable[[], list[torch.Tensor]] | None = None,
    ) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        self.group, self.replicate_groups = group, replicate_groups
        self.world = group.size()
        rank = dist.get_rank(group)
        self.comm_dtype, self.reduce_dtype, self.divide = dtype, reduce_dtype, divide
        self.chunks = [math.ceil(s[0] / self.world) for s in self.shapes]  # torch.chunk's rows per rank
        self.rows = [max(0, min(c, s[0] - rank * c)) for c, s in zip(self.chunks, self.shapes)]
        self.inner = [math.prod(s[1:]) for s in self.shapes]
        self.padded = [c * q for c, q in zip(self.chunks, self.inner)]
        self.recompute = recompute
        self.owners: list[torch.Tensor] = []  # the full tensors (padded), each its own storage
        self.track = _tracked()
        self.extra: list[torch.Tensor] = []  # further inputs whose gradient backward() gives (the scalars)
        self.device = torch.device("cpu")  # the shards' (known once run)

    def run(self, locals_: list[torch.Tensor]) -> list[torch.Tensor]:
        """All-gather the local shards (cast to the gather dtype); the full tensors, views of :attr:`owners`."""
        self.device = locals_[0].device
        flat = torch.empty(sum(self.padded), dtype=self.comm_dtype, device=self.device)
        off = 0
        for x, pn, r, q in zip(locals_, self.padded, self.rows, self.inner):
            flat[off : off + r * q].copy_(x.reshape(-1))  # copy_ casts: mixed in fp32, gathered in param_dtype
            flat[off + r * q : off + pn].zero_()
            off += pn
        if not self.owners:
            self.owners = [torch.empty(self.world * pn, dtype=self.comm_dtype, device=flat.device) for pn in self.padded]
            _OWNERS.update(self.owners)
        out = torch.empty(self.world * flat.numel(), dtype=flat.dtype, device=flat.device)
        all_gather_flat(out, flat, self.group)
        views = [o.view(self.world, pn) for o, pn in zip(self.owners, self.padded)]
        torch.split_with_sizes_copy(out.view(self.world, -1), self.padded, dim=1, out=views)
        return [o.view(self.world * c, *s[1:]).narrow(0, 0, s[0]) for o, c, s in zip(self.owners, self.chunks, self.shapes)]

    def reduce(self, grads: tuple[torch.Tensor | None, ...], which: list[int] | None = None) -> list[torch.Tensor | None]:
        """Reduce-scatter the full gradients (``None``: zero) and divide: each rank's shard of the mean.

        ``which``: the tensors to reduce (default: all), the same on every rank; the others' shards are ``None``.
        """
        which = list(range(len(self.shapes))) if which is None else which
        rdtype = self.reduce_dtype or self.comm_dtype  # a full tensor's gradient comes in its dtype
        send = torch.zeros(self.world, sum(self.padded[i] for i in which), dtype=rdtype, device=self.device)
        off = 0
        for i in which:
            g, s, c, pn = grads[i], self.shapes[i], self.chunks[i], self.padded[i]
            if g is not None:
                if s[0] != self.world * c:  # pad the last chunk, as FSDP does
                    g = torch.cat([g.reshape(s[0], -1), g.new_zeros(self.world * c - s[0], math.prod(s[1:]))])
                send[:, off : off + pn].copy_(g.reshape(self.world, pn))
            off += pn
        recv = torch.empty(send.shape[1], dtype=rdtype, device=send.device)
        _reduce_scatter(recv, send.view(-1), self.group)
        for group in self.replicate_groups:  # HSDP: the replicas of a shard saw other data
            dist.all_reduce(recv, group=group)
        recv.div_(self.divide)
        self.owners = []  # every consumer of the full tensors has run: their storage leaves with the graph
        out: list[torch.Tensor | None] = [None] * len(self.shapes)
        off = 0
        for i in which:
            s, r, q, pn = self.shapes[i], self.rows[i], self.inner[i], self.padded[i]
            out[i] = recv[off : off + r * q].view(r, *s[1:])
            off += pn
        return out

    def backward(self, grads: tuple[torch.Tensor | None, ...]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """The gradients of the local shards and of :attr:`extra` (none here: see the sampled gather)."""
        if all(g is None for g in grads):
            return [None] * len(grads), []
        return self.reduce(grads), []

    def _refill(self) -> None:
        self.run(self.recompute())


class Computed(_Releasable):
    """A full tensor computed by ``fn`` from gathered neighbours (the slow path), under activation checkpointing.

    Only the local shards are kept for the backward: the checkpoint replays ``fn`` (gathering again) for the
    gradients, and :meth:`regather` refills the output the consumers saved, with the scalars' values of the
    forward (FSDP frees their unsharded copy after the block's forward).
    """

    def __init__(self, fn: Callable[[], torch.Tensor], site: nn.Module) -> None:
        self.fn, self.site = fn, site
        self.values = {n: p.detach().clone() for n, p in site._parameters.items() if p is not None}
        self.owners: list[torch.Tensor] = []
        self.track = _tracked()

    def run(self) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        out = checkpoint(self.fn, use_reentrant=False) if torch.is_grad_enabled() else self.fn()
        if self.track:
            self.owners = [out]
            _OWNERS.add(out)
        return out

    def _refill(self) -> None:
        params = self.site._parameters
        kept = {n: params[n] for n in self.values}
        try:
            params.update(self.values)  # FSDP swaps a parameter's unsharded value in the same way
            self.owners[0].copy_(self.fn())
        finally:
            params.update(kept)
        self.owners = []  # the consumers hold it until they have run


class GatherShards(torch.autograd.Function):
    """``Gather.run`` in the forward, ``Gather.backward`` in the backward.

    Inputs: the gather, the local shards, then the gather's :attr:`~Gather.extra` tensors (which receive the
    gradient its backward computes for them, e.g. a sampled scalar gradient).
    """

    @staticmethod
    def forward(ctx: Any, gather: Gather, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no full-size zeros)
        ctx.gather = gather
        locals_ = inputs[: len(gather.shapes)]
        ctx.dtypes = [x.dtype for x in locals_]
        out = tuple(gather.run(list(locals_)))
        if not gather.track:
            gather.owners = []  # nothing will be freed or gathered again: the outputs own their storage
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        shards, extra = ctx.gather.backward(grads)
        extra = extra + [None] * (len(ctx.gather.extra) - len(extra))
        return (None, *[None if g is None else g.to(d) for g, d in zip(shards, ctx.dtypes)], *extra)


class ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale`` (a replaced block's scalars, on shards).

    With a ``unit``, the backward first waits for FSDP's pending reduction of that unit (accelerators): a coupled
    neighbour's gradient flows into its sharded gradient, which FSDP writes on its reduce-scatter stream.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, unit: Any = None) -> torch.Tensor:
        ctx.scale, ctx.unit = scale, unit
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.unit is not None:
            fsdp_state.wait_for_reduce(ctx.unit)
        return (grad if ctx.scale == 1 else grad * ctx.scale), None, None


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: Any, async_op: bool = False) -> Any:
    """All-gather equal 1-d tensors into ``out`` (rank after rank); with ``async_op`` the work handle."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    return fn(out, inp, group=group, async_op=async_op)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)
