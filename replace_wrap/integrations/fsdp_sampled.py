"""The sampled scalar gradient of replaced linear layers whose neighbours are FSDP2 shards.

Under FSDP2 a replaced block's tensors are mixed on the neighbours' local shards and all-gathered
(:mod:`.fsdp_synthesis`). Differentiated by autograd, a replaced linear layer then pays what a trained one
pays: the full weight gradient ``dW = dy^T x`` and its reduce-scatter, only for ``<dW, P>`` and ``<dW, N>``.
The default estimator (:mod:`replace_wrap.synthesis.estimators`) needs neither:

- **forward**: the layer computes ``y = x W^T`` with the gathered ``W`` and keeps the rows of ``x`` it samples
  (``m = max(16, N/64)`` of ``N``, the single-process rule, drawn on each rank from its own rows);
- **backward**: the input gradient ``dy W`` as a frozen layer's; no ``dW``. The layer hands its sampled rows
  and their output gradients to the block's gather, which, once every layer of the block has run its backward,
  all-gathers them over the shard group (one collective for the block, ``m * (in + out + 1)`` floats per
  layer and rank, against the ``in * out`` of the weight's reduce-scatter) and takes the thin products of
  every rank's rows with this rank's shards ``P_r``, ``N_r`` (rows ``r`` of ``W``: output features of an
  ``nn.Linear``, input features of an HF ``Conv1D``). Rank ``r`` thus computes ``c_r``, the part of every rank's
  estimate that falls on its shard, and returns it as the scalars' gradient; FSDP's own reduction of the
  scalars sums the ``c_r`` over the ranks (replicas included) and divides by its factor ``F``, which gives
  ``(1/F) sum_k est_k``: the estimate of ``<g, P>`` for ``g`` the averaged gradient, unbiased because each
  ``est_k`` is. With ``m >= N`` every row is kept and the gradient is exact.

Where the rows would cost more bytes than the weight's gradient (``world * m * (in + out + 1)`` against the
weight's padded size: many tokens on narrow layers), each rank instead reduce-scatters the weight gradient of
its own sampled rows (``dy_s^T x_s * N/m``: unbiased too, ``m/N`` of the exact product) with the block's other
tensors, and the scalars take their gradient from its shard as on the exact path.

The block's other gradients (norms, biases: :class:`Plan` tensors that do not sample, and sampled weights that
went dense) are reduce-scattered as FSDP would, unless they are small (``world`` times their floats at most
:data:`FOLD_FLOATS_MAX`): then they ride in the rows' all-gather, each rank summing every rank's full gradients
for its shard, and the block's backward runs one collective of its own instead of two.

What every rank must agree on is decided without data: which tensors sample (:attr:`Plan.sampled`: the layer
type and the settings). What depends on data is known when the block's forward ends and exchanged then,
asynchronously, in one small all-gather (maximized over HSDP replicas first): each rank's row count per tensor,
and whether a sampled weight was also read outside its layer's kernel (``note_read``; even a read of its
``dtype`` counts), whose gradient is then reduce-scattered on every rank with the block's other tensors
(biases, norms). So the collectives of every rank agree, and the backward reads the exchanged header without
waiting for the device.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ..synthesis.estimators import autocast_dtype, sample_units
from ..synthesis.mixing import SOURCES_ATTR, generic_only
from ..synthesis.kernels import first_order
from ..synthesis.lean_layers import autocast_linear, autocast_off
from . import fsdp_state
from .fsdp_collectives import Gather, all_gather_flat, in_backward
from .fsdp_planning import Plan, plan_for

__all__ = [
    "FOLD_FLOATS_MAX", "ROWS_PER_SHARD_MAX", "SampledGather", "Slot", "announcing", "note_read", "sharded_linear",
]

Slot = tuple["SampledGather", int]  # a sampled weight of one forward: its gather, and its index there
# A sampled weight's rows are all-gathered while they are at most this many times the floats of the weight's
# padded shard (what its gradient's reduce-scatter would send per rank); beyond, the rows make a sampled weight
# gradient, reduce-scattered (see SampledGather.backward).
ROWS_PER_SHARD_MAX = 1.0
# The block's other gradients (norms, biases) travel in the rows' all-gather, each rank summing every rank's
# full gradients, while every rank receives at most this many floats of them (1 MiB in fp32): one collective
# latency saved for (world - 1) times their floats. Beyond, they are reduce-scattered (see SampledGather.backward).
FOLD_FLOATS_MAX = 1 << 18
_KERNEL = threading.local()  # .reading: a sampled layer's kernel reads its weight; .slot: what the read found


def note_read(slot: Slot | None) -> None:
    """Every read of a synthesized tensor under FSDP2 inside a forward passes here with its slot (``None`` for
    tensors that do not sample). The layer's own kernel takes the slot; any other reader may give the weight a
    dense gradient, which must then be reduce-scattered on every rank."""
    if slot is None:
        return
    if getattr(_KERNEL, "reading", False):
        _KERNEL.slot = slot
        return
    slot[0].dense.add(slot[1])
    slot[0].announce_read()


def announcing() -> bool:
    """Whether a forward's gathers announce their header now: only where a backward may follow (grad mode,
    which every rank shares) and not in a checkpoint's replay (its gathers take no backward)."""
    return torch.is_grad_enabled() and not in_backward()


class _Rows(NamedTuple):
    x: torch.Tensor  # (m, in) the sampled rows of the input
    dy: torch.Tensor  # (m, out) their output gradients
    weight: float  # N / m


class SampledGather(Gather):
    """A :class:`Gather` some of whose tensors (``plans[i].sampled``) take the sampled scalar gradient.

    :attr:`extra` holds the scalars ``a, b`` of each sampled tensor (two inputs per tensor, in the order of
    :attr:`sampled`); :meth:`backward` returns their gradient. What the backward's collectives carry is known
    when the block's forward ends: the rows each layer sampled (:meth:`count`) and which sampled weights were
    also read outside their layer's kernel (:func:`note_read`), whose gradient is then reduce-scattered.
    :meth:`announce` sends these facts to the other ranks then, without waiting; the backward reads the
    answer, which has long arrived (on CUDA through pinned memory and an event: no device synchronization).
    """

    def __init__(self, plans: list[Plan], coefficients: list[tuple[torch.Tensor, torch.Tensor]], *args: Any,
                 **kwargs: Any) -> None:
        super().__init__([p.prev.param.shape for p in plans], *args, **kwargs)  # type: ignore[union-attr]
        self.plans = plans
        self.sampled = [i for i, p in enumerate(plans) if p.sampled is not None]
        self.extra = [c for i in self.sampled for c in coefficients[i]]
        self.sampled_rows = {i: 0 for i in self.sampled}  # rows the layers sampled in the forward
        self.dense: set[int] = set()  # sampled tensors also read outside their kernel
        self.records: dict[int, list[_Rows]] = {}
        self._header: tuple[Any, torch.Tensor, Any] | None = None
        self.owned = False  # a block's forward announces it when it ends (else its one reader does: announce_read)

    def count(self, i: int, rows: int) -> None:
        """A layer's forward: it sampled ``rows`` rows of sampled tensor ``i``."""
        self.sampled_rows[i] += rows

    def announce_read(self) -> None:
        """After the one read of a gather made for one read (``recompute=True`` checkpoints inside the block,
        whose replays see no block hooks): what it will carry is known now, so it is announced now."""
        if not self.owned and announcing():
            self.announce()

    def record(self, i: int, x: torch.Tensor, dy: torch.Tensor, weight: float) -> None:
        """A layer's backward: the rows it sampled of its input and output gradient, and their rescale."""
        self.records.setdefault(i, []).append(_Rows(x, dy, weight))

    def announce(self) -> None:
        """Start the exchange of every rank's row counts and dense reads (once; the backward waits for it).

        Under HSDP the counts are first maximized and the flags or-ed over the replicas, so that every rank of
        the mesh decides alike what it reduce-scatters (the replicas all-reduce the reduce-scatter's result).
        """
        if self._header is not None:
            return
        mine = torch.tensor([self.sampled_rows[i] for i in self.sampled] + [int(i in self.dense) for i in self.sampled],
                            dtype=torch.int64).to(self.device, non_blocking=True)
        for group in self.replicate_groups:
            dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
        out = torch.empty(self.world * mine.numel(), dtype=torch.int64, device=self.device)
        work = all_gather_flat(out, mine, self.group, async_op=True)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                work.wait()  # the current stream waits for the collective; the host does not
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self._header = (None, host, event)
        else:
            self._header = (work, out, None)

    def _exchanged(self) -> list[list[list[int]]]:
        """``[rank][0: rows, 1: dense][sampled tensor]``, every rank's."""
        self.announce()  # a gather whose forward announced nothing (no gradient was recorded then)
        work, out, event = self._header  # type: ignore[misc]
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return out.view(self.world, 2, len(self.sampled)).tolist()

    def backward(self, grads: tuple[torch.Tensor | None, ...]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        with autocast_off(self.device):  # a backward inside an autocast region: the products in our dtypes
            return self._backward(grads)

    def _backward(self, grads: tuple[torch.Tensor | None, ...]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        header = self._exchanged()
        most = {i: max(h[0][j] for h in header) for j, i in enumerate(self.sampled)}
        dense = {i for j, i in enumerate(self.sampled) if any(h[1][j] for h in header)}
        # Rows cost world * m * (in + out + 1) floats to gather, the weight's gradient world * its padded shard to
        # reduce-scatter: where the rows cost more (many tokens on narrow layers), and where the weight's gradient
        # is reduce-scattered anyway (read outside its layer somewhere), this rank's sampled rows make a sampled
        # weight gradient instead (dy_s^T x_s * N/m: unbiased, m/N of the exact one's arithmetic), reduce-scattered
        # with the block's other tensors. Every rank of the mesh sees the same header, so decides alike.
        grads = list(grads)
        for i in self.sampled:
            if i in dense or most[i] * (sum(self._dims(i)) + 1) > ROWS_PER_SHARD_MAX * self.padded[i]:
                dense.add(i)
                grads[i] = self._sampled_dw(i, grads[i])
        which = [i for i in range(len(self.shapes)) if i not in self.sampled or i in dense]
        rows = [i for i in self.sampled if i not in dense]
        # The gradients to reduce ride in the rows' all-gather when the rows are gathered anyway and they are small
        # (a replaced block's norms and biases): one collective, not two. Decided from shapes and the header alone.
        fold = bool(rows) and self.world * sum(self.shapes[i].numel() for i in which) <= FOLD_FLOATS_MAX
        shards = self.reduce(tuple(grads), which) if which and not fold else [None] * len(self.shapes)
        extra = self._exchange(rows, most, grads, which if fold else [], shards)
        self.records, self._header = {}, None
        self.owners = []  # every consumer of the full tensors has run: their storage leaves with the graph
        return shards, extra

    def _sampled_dw(self, i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """``grad`` plus the weight gradient of this rank's sampled rows of tensor ``i``, rescaled by ``N/m``."""
        for r in self.records.get(i, ()):
            dt = torch.promote_types(r.x.dtype, torch.float32)
            x, dy = r.x.to(dt), r.dy.to(dt) * r.weight
            dw = dy.t() @ x if self.plans[i].sampled == "out_in" else x.t() @ dy  # the weight's own layout
            grad = dw if grad is None else grad + dw.to(grad.dtype)
        return None if grad is None else grad.to(self.comm_dtype)

    def _exchange(self, sampled: list[int], most: dict[int, int], grads: list[torch.Tensor | None], fold: list[int],
                  shards: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The scalars' gradients (:attr:`extra` order) from every rank's rows of the tensors ``sampled``, in one
        all-gather that also carries the full gradients of the tensors ``fold``, whose shards of the mean it
        writes into ``shards`` (what :meth:`reduce` would give)."""
        out: list[torch.Tensor | None] = [None] * len(self.extra)
        widths = {i: sum(self._dims(i)) + 1 for i in sampled}  # x, dy and the rescale of each row
        rows_total = sum(most[i] * widths[i] for i in sampled)
        total = rows_total + sum(self.shapes[i].numel() for i in fold)
        if total == 0:
            return out
        # the payload in at least fp32 (the rows' products, as the single-process estimator) and the reduce dtype
        dt = torch.promote_types(self.comm_dtype, torch.promote_types(self.reduce_dtype or torch.float32, torch.float32))
        send = torch.zeros(total, dtype=dt, device=self.device)
        off = rows_total
        for i in fold:
            if grads[i] is not None:
                send[off : off + self.shapes[i].numel()].copy_(grads[i].reshape(-1))
            off += self.shapes[i].numel()
        off = 0
        for i in sampled:
            block = send[off : off + most[i] * widths[i]].view(most[i], widths[i])
            at = 0
            for r in self.records.get(i, ()):
                k, fin = r.x.shape
                block[at : at + k, :fin].copy_(r.x)
                block[at : at + k, fin:-1].copy_(r.dy)
                block[at : at + k, -1] = r.weight
                at += k
            off += most[i] * widths[i]
        recv = torch.empty(self.world * total, dtype=dt, device=self.device)
        all_gather_flat(recv, send, self.group)
        recv = recv.view(self.world, total)
        if fold:
            self._fold(recv[:, rows_total:], fold, shards)
        off = 0
        for i in sampled:
            rows = recv[:, off : off + most[i] * widths[i]].reshape(self.world * most[i], widths[i])
            off += most[i] * widths[i]
            j = self.sampled.index(i)
            out[2 * j], out[2 * j + 1] = self._contribution(i, rows, *self.extra[2 * j : 2 * j + 2])
        return out

    def _fold(self, recv: torch.Tensor, fold: list[int], shards: list[torch.Tensor | None]) -> None:
        """Every rank's full gradients of the tensors ``fold`` (``(world, floats)``): this rank's shard of their
        mean, as the reduce-scatter would give it (all-reduced over HSDP replicas too, and divided)."""
        rank = dist.get_rank(self.group)
        parts, off = [], 0
        for i in fold:  # every rank's values of this rank's shard, summed (the rest is other ranks' to sum)
            q, start = self.inner[i], rank * self.chunks[i]
            parts.append(recv[:, off + start * q : off + (start + self.rows[i]) * q].sum(0))
            off += self.shapes[i].numel()
        flat = torch.cat(parts).to(self.reduce_dtype or self.comm_dtype)
        for group in self.replicate_groups:  # HSDP: the replicas of a shard saw other data
            dist.all_reduce(flat, group=group)
        flat.div_(self.divide)
        at = 0
        for i, part in zip(fold, parts):
            shards[i] = flat[at : at + part.numel()].view(self.rows[i], *self.shapes[i][1:])
            at += part.numel()

    def _dims(self, i: int) -> tuple[int, int]:
        """``(in, out)`` of sampled tensor ``i``."""
        s = self.shapes[i]
        return (s[1], s[0]) if self.plans[i].sampled == "out_in" else (s[0], s[1])

    def _contribution(self, i: int, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of ``<dW, P>``, ``<dW, N>`` over every rank's sampled rows (``x | dy | N/m``)."""
        plan = self.plans[i]
        fin = self._dims(i)[0]
        p, n = plan.prev.param.to_local().detach(), plan.next.param.to_local().detach()  # type: ignore[union-attr]
        start, count = dist.get_rank(self.group) * self.chunks[i], self.rows[i]
        if count == 0:
            return torch.zeros_like(a), torch.zeros_like(b)
        dt = torch.promote_types(p.dtype, torch.float32)  # as the single-process estimator: at least fp32
        p, n = p.to(dt), n.to(dt)
        x, dy = rows[:, :fin].to(dt), rows[:, fin:-1].to(dt) * rows[:, -1:].to(dt)
        if plan.sampled == "out_in":  # W (out, in), this rank's rows are output features
            d = dy[:, start : start + count].reshape(-1)
            ga, gb = torch.dot((x @ p.t()).reshape(-1), d), torch.dot((x @ n.t()).reshape(-1), d)
        else:  # W (in, out), this rank's rows are input features: y = x @ W
            xs, d = x[:, start : start + count], dy.reshape(-1)
            ga, gb = torch.dot((xs @ p).reshape(-1), d), torch.dot((xs @ n).reshape(-1), d)
        return ga.to(a.dtype).reshape(a.shape), gb.to(b.dtype).reshape(b.shape)


# --- the layer ----------------------------------------------------------------------------------------------


class _ShardedLinear(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with the gathered ``W``: no weight gradient, the sampled rows to the gather."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, slot: tuple[SampledGather, int],
        transposed: bool, sample: Any, dtype: torch.dtype | None,
    ) -> torch.Tensor:
        xc, y = autocast_linear(x, w.t() if transposed else w, bias, dtype)  # the weight as (out, in)
        rows, scale = sample_units(x.shape[0], sample, x.device)
        kept = xc if rows is None else xc.index_select(0, rows)
        slot[0].count(slot[1], kept.shape[0])
        # the full weight through save_for_backward: FSDP-style, its storage is freed after the block's forward
        # and gathered again before its backward (fsdp_collectives)
        ctx.save_for_backward(kept, rows, w)
        ctx.slot, ctx.transposed, ctx.scale, ctx.dtype = slot, transposed, scale, dtype
        return y

    @staticmethod
    @first_order
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept, rows, w = ctx.saved_tensors
        need_x, _, need_bias = ctx.needs_input_grad[:3]
        gx = db = None
        if need_x:
            w2 = w.t() if ctx.transposed else w
            if ctx.dtype is not None:
                w2 = w2.to(ctx.dtype)
            with autocast_off(dy.device):  # a backward inside an autocast region: the forward's dtypes
                gx = dy.to(w2.dtype) @ w2  # shape: (N, out) @ (out, in) -> (N, in)
        if need_bias:
            db = dy.sum(0)
        gather, i = ctx.slot
        gather.record(i, kept, dy if rows is None else dy.index_select(0, rows), ctx.scale)
        return gx, None, db, None, None, None, None


def sharded_linear(layer: nn.Module, x: torch.Tensor, transposed: bool) -> Any:
    """The forward of a replaced linear layer whose weight is gathered from FSDP2 shards with a sampled scalar
    gradient, or ``NotImplemented`` (the generic path, exact) when that does not apply. Called without gradients
    (a training layer: reentrant checkpointing's first forward), it draws the rows the kernel would and takes the
    generic path."""
    src = layer.__dict__.get(SOURCES_ATTR, {}).get("weight")
    if src is None or not (fsdp_state.is_managed(src.prev) or fsdp_state.is_managed(src.next)):
        return NotImplemented
    if torch.compiler.is_compiling() or generic_only():  # as the layer kernels (layer_kernels.mix_source)
        return NotImplemented
    plan = plan_for(layer, "weight", src)
    site = src.site
    if plan is None or plan.sampled is None or site.ab_grad_sample is None or not site.fast_path:
        return NotImplemented  # (settings changed since the plan: the generic read marks the weight dense)
    if not torch.is_grad_enabled():  # a training forward without gradients: the generic path, after the draw
        # (With gradients a layer called outside its block's forward draws nothing, below: the read tells. Without
        # them the read announces nothing, so such a layer draws here, and reentrant checkpointing does not
        # replay it exactly; a layer in its block, the case of every model seen, does.)
        sample_units(x.numel() // max(1, x.shape[-1]), site.ab_grad_sample, x.device)  # _ShardedLinear's
        return NotImplemented
    _KERNEL.reading, _KERNEL.slot = True, None
    try:
        w = layer.weight  # type: ignore[attr-defined]
    finally:
        _KERNEL.reading = False
    slot, _KERNEL.slot = _KERNEL.slot, None
    if slot is None:  # read outside the block's forward (a sharded DTensor)
        return NotImplemented
    bias = layer.bias  # type: ignore[attr-defined]
    rows = x.reshape(-1, x.shape[-1])  # as mixed_linear: the Function sees rows only
    y = _ShardedLinear.apply(rows, w, bias, slot, transposed, site.ab_grad_sample, autocast_dtype(x))
    slot[0].announce_read()  # (outside the Function's forward, which runs without grad mode)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
