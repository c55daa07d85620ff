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

What every rank must agree on is decided without data: which tensors sample (:attr:`Plan.sampled`: the layer
type and the settings). What depends on data is exchanged first, in one small all-gather: each rank's row
count per tensor and whether it received a dense gradient for it (the weight also read outside the layer's
forward): such a tensor is reduce-scattered too, on every rank, with the block's other tensors (biases,
norms), so collectives never diverge.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..synthesis.estimators import autocast_dtype, sample_units
from ..synthesis.layer_kernels import SOURCES_ATTR
from . import fsdp_state
from .fsdp_collectives import Gather, all_gather_flat
from .fsdp_planning import Plan, plan_for

__all__ = ["SLOT_ATTR", "SampledGather", "note_read", "sharded_linear"]

SLOT_ATTR = "_rw_sample_slot"  # on a gathered full weight: (its SampledGather, its index there)
_KERNEL = threading.local()  # .reading: a sampled layer's kernel is reading its own weight


def note_read(full: torch.Tensor) -> torch.Tensor:
    """Every read of a synthesized tensor under FSDP2 passes here: a sampled weight read by anything but its
    layer's kernel may receive a dense gradient, which must then be reduce-scattered on every rank."""
    slot = full.__dict__.get(SLOT_ATTR)
    if slot is not None and not getattr(_KERNEL, "reading", False):
        slot[0].dense.add(slot[1])
    return full


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

    def count(self, i: int, rows: int) -> None:
        """A layer's forward: it sampled ``rows`` rows of sampled tensor ``i``."""
        self.sampled_rows[i] += rows

    def record(self, i: int, x: torch.Tensor, dy: torch.Tensor, weight: float) -> None:
        """A layer's backward: the rows it sampled of its input and output gradient, and their rescale."""
        self.records.setdefault(i, []).append(_Rows(x, dy, weight))

    def announce(self) -> None:
        """Start the exchange of every rank's row counts and dense reads (once; the backward waits for it)."""
        if self._header is not None:
            return
        mine = torch.tensor([self.sampled_rows[i] for i in self.sampled] + [int(i in self.dense) for i in self.sampled],
                            dtype=torch.int64).to(self.device, non_blocking=True)
        out = torch.empty(self.world * mine.numel(), dtype=torch.int64, device=self.device)
        work = all_gather_flat(out, mine, self.group, async_op=True)
        if self.device.type == "cuda":
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
        self.announce()  # a gather no block hook saw end (recompute=True): exchanged now
        work, out, event = self._header  # type: ignore[misc]
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return out.view(self.world, 2, len(self.sampled)).tolist()

    def backward(self, grads: tuple[torch.Tensor | None, ...]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        header = self._exchanged()
        most = [max(h[0][j] for h in header) for j in range(len(self.sampled))]
        dense = {i for j, i in enumerate(self.sampled) if any(h[1][j] for h in header)}
        which = [i for i in range(len(self.shapes)) if i not in self.sampled or i in dense]
        shards = self.reduce(grads, which) if which else [None] * len(self.shapes)
        extra = self._scalar_grads(most, self.device)
        self.records, self._header = {}, None
        self.owners = []  # every consumer of the full tensors has run: their storage leaves with the graph
        return shards, extra

    def _scalar_grads(self, most: list[int], device: torch.device) -> list[torch.Tensor | None]:
        widths = [sum(self._dims(i)) + 1 for i in self.sampled]  # x, dy and the rescale of each row
        total = sum(m * w for m, w in zip(most, widths))
        if total == 0:
            return [None] * len(self.extra)
        send = torch.zeros(total, dtype=torch.float32, device=device)
        off = 0
        for i, m, w in zip(self.sampled, most, widths):
            block = send[off : off + m * w].view(m, w)
            at = 0
            for r in self.records.get(i, ()):
                k = r.x.shape[0]
                fin = r.x.shape[1]
                block[at : at + k, :fin].copy_(r.x)
                block[at : at + k, fin:-1].copy_(r.dy)
                block[at : at + k, -1] = r.weight
                at += k
            off += m * w
        recv = torch.empty(self.world * total, dtype=torch.float32, device=device)
        all_gather_flat(recv, send, self.group)
        recv = recv.view(self.world, total)
        out: list[torch.Tensor | None] = []
        off = 0
        for i, m, w in zip(self.sampled, most, widths):
            rows = recv[:, off : off + m * w].reshape(self.world * m, w)
            off += m * w
            out.extend(self._contribution(i, rows))
        return out

    def _dims(self, i: int) -> tuple[int, int]:
        """``(in, out)`` of sampled tensor ``i``."""
        s = self.shapes[i]
        return (s[1], s[0]) if self.plans[i].sampled == "out_in" else (s[0], s[1])

    def _contribution(self, i: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of ``<dW, P>``, ``<dW, N>`` over every rank's sampled rows (``x | dy | N/m``)."""
        plan = self.plans[i]
        fin, fout = self._dims(i)
        p, n = plan.prev.param.to_local().detach(), plan.next.param.to_local().detach()  # type: ignore[union-attr]
        a, b = self.extra[2 * self.sampled.index(i)], self.extra[2 * self.sampled.index(i) + 1]
        start, count = dist.get_rank(self.group) * self.chunks[i], self.rows[i]
        if count == 0:
            return torch.zeros_like(a), torch.zeros_like(b)
        dt = p.dtype
        x, dy = rows[:, :fin].to(dt), rows[:, fin:-1].to(dt) * rows[:, -1:].to(dt)
        if plan.sampled == "out_in":  # W (out, in), this rank's rows are output features
            d, xs = dy[:, start : start + count], x
            ga = torch.dot((xs @ p.t()).reshape(-1), d.reshape(-1))
            gb = torch.dot((xs @ n.t()).reshape(-1), d.reshape(-1))
        else:  # W (in, out), this rank's rows are input features: y = x @ W
            xs = x[:, start : start + count]
            ga = torch.dot((xs @ p).reshape(-1), dy.reshape(-1))
            gb = torch.dot((xs @ n).reshape(-1), dy.reshape(-1))
        return ga.to(a.dtype).reshape(a.shape), gb.to(b.dtype).reshape(b.shape)


# --- the layer ----------------------------------------------------------------------------------------------


class _ShardedLinear(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with the gathered ``W``: no weight gradient, the sampled rows to the gather."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, slot: tuple[SampledGather, int],
        transposed: bool, sample: Any, dtype: torch.dtype | None,
    ) -> torch.Tensor:
        w2 = w.t() if transposed else w  # (out, in)
        if dtype is not None:  # autocast: compute like F.linear under autocast would
            xc, wc = x.to(dtype), w2.to(dtype)
            bc = None if bias is None else bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(xc, wc, bc)
        else:
            xc, y = x, F.linear(x, w2, bias)
        rows, scale = sample_units(x.shape[0], sample, x.device)
        kept = xc if rows is None else xc.index_select(0, rows)
        slot[0].count(slot[1], kept.shape[0])
        # the full weight through save_for_backward: FSDP-style, its storage is freed after the block's forward
        # and gathered again before its backward (fsdp_collectives)
        ctx.save_for_backward(kept, rows, w)
        ctx.slot, ctx.transposed, ctx.scale, ctx.dtype = slot, transposed, scale, dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept, rows, w = ctx.saved_tensors
        need_x, _, need_bias = ctx.needs_input_grad[:3]
        gx = db = None
        if need_x:
            w2 = w.t() if ctx.transposed else w
            if ctx.dtype is not None:
                w2 = w2.to(ctx.dtype)
            gx = dy.to(w2.dtype) @ w2  # shape: (N, out) @ (out, in) -> (N, in)
        if need_bias:
            db = dy.sum(0)
        gather, i = ctx.slot
        gather.record(i, kept, dy if rows is None else dy.index_select(0, rows), ctx.scale)
        return gx, None, db, None, None, None, None


def sharded_linear(layer: nn.Module, x: torch.Tensor, transposed: bool) -> Any:
    """The forward of a replaced linear layer whose weight is gathered from FSDP2 shards with a sampled scalar
    gradient, or ``NotImplemented`` (the generic path, exact) when that does not apply."""
    src = layer.__dict__.get(SOURCES_ATTR, {}).get("weight")
    if src is None or not (fsdp_state.is_managed(src.prev) or fsdp_state.is_managed(src.next)):
        return NotImplemented
    if torch.compiler.is_compiling():
        return NotImplemented
    plan = plan_for(layer, "weight", src)
    if plan is None or plan.sampled is None:
        return NotImplemented
    _KERNEL.reading = True
    try:
        w = layer.weight  # type: ignore[attr-defined]
    finally:
        _KERNEL.reading = False
    slot = w.__dict__.get(SLOT_ATTR)
    if slot is None:  # read outside the block's forward (a sharded DTensor)
        return NotImplemented
    bias = layer.bias  # type: ignore[attr-defined]
    rows = x.reshape(-1, x.shape[-1])  # as mixed_linear: the Function sees rows only
    y = _ShardedLinear.apply(rows, w, bias, slot, transposed, src.site.ab_grad_sample, autocast_dtype(x))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
