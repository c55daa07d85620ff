"""Synthesizing a replaced block's tensors from its neighbours' FSDP2 shards.

With one FSDP2 unit per block (torchtitan's ``for block in layers: fully_shard(block)``), a replaced block
runs while its neighbours' units are sharded. FSDP2 shards every parameter on dim 0 by the same rule
(``torch.chunk`` over the mesh, padded to equal chunks), and a synthesized tensor has exactly its neighbours'
shape, so ``a * P_local + b * N_local`` on the neighbours' local shards *is* the local shard of the
synthesized tensor. The replaced block then does what FSDP does for an ordinary block:

- **forward**: at the first read of one of its synthesized tensors, every tensor of the block is mixed on
  the local shards (in the shards' dtype, fp32 under mixed precision), cast to the unit's ``param_dtype`` and
  all-gathered in one collective (the bytes FSDP gathers for an ordinary block). The full tensors are freed
  when the block's forward ends (unless the unit has ``reshard_after_forward=False``) and gathered again from
  the shards when the gradient reaches the block's outputs, so at most this block's tensors are unsharded.
- **backward**: the full gradient of every synthesized tensor (each rank's, from its own data; under the
  sampled default not the replaced linear layers' weights, whose scalar gradient :mod:`.fsdp_sampled`
  estimates from all-gathered rows) is reduce-scattered in one collective in the unit's ``reduce_dtype``
  and divided like FSDP's (by the data parallel size, or the unit's gradient divide factor): each rank holds
  the shard ``g_r`` of the averaged gradient ``g``. A coupled neighbour receives ``a * g_r`` straight into its sharded gradient, which FSDP
  accumulates with its own reduced gradient. The scalar ``a`` receives ``F / R * <g_r, P_r>`` on each rank
  (``F`` the divide factor, ``R`` the replica count under HSDP); FSDP's reduction of the scalar's gradient
  sums these over the ranks and divides by ``F``, giving exactly ``<g, P>``: the single-process gradient.
  Its cost is one dot product over the local shard per tensor; the scalars' own reduction is FSDP's.

Tensors that cannot be mixed shard-wise (a neighbour of another shape, a rule with its own synthesis, other
placements) take a slower exact path: the neighbours are gathered in full (their gradient reduce-scattered
back), the tensor is synthesized from them as without FSDP, under activation checkpointing so that only the
local shards are kept for the backward.

The getter of every synthesized tensor (:mod:`replace_wrap.surgery.swap`) calls :func:`synthesize` first;
the block hooks :func:`block_pre_forward` / :func:`block_post_forward` are attached to every replaced block
by ``convert`` (:mod:`replace_wrap.integrations.fsdp`). Without FSDP both cost one dictionary read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..surgery.site import SITE_ATTR
from ..synthesis.mixing import TensorSource
from . import fsdp_state
from .fsdp_collectives import Computed, Gather, GatherShards, ScaleGrad, in_backward, saved_tensor_hooks_active
from .fsdp_planning import (
    Plan,
    block_plans,
    checked_settings,
    coefficients,
    divide_factor,
    groups,
    local_mix,
    outside_forward,
    plan_for,
    scalar_scale,
    synthesize_gathered,
)
from .fsdp_sampled import SampledGather, Slot, announcing, note_read


_ACTIVE = "_rw_fsdp_forwards"  # on a site: stack of _BlockForward, one per running forward of its block


# --- entry points -----------------------------------------------------------------------------------------


def synthesize(leaf: nn.Module, name: str, src: TensorSource) -> torch.Tensor | None:
    """``leaf.<name>`` computed from the neighbours' shards, or ``None`` when the ordinary getter applies.

    Inside the replaced block's forward: the full tensor. Outside it (a read between steps): a sharded
    DTensor like every other FSDP parameter at that time (``.full_tensor()`` gathers it).
    """
    if not (fsdp_state.is_managed(src.prev) or fsdp_state.is_managed(src.next)):
        return None
    plan = plan_for(leaf, name, src)
    if plan is None:
        return None
    stack = src.site.__dict__.get(_ACTIVE)
    checkpointed = saved_tensor_hooks_active()
    if stack and (stack[-1].checkpointed or not checkpointed):
        return stack[-1].read(plan)
    if stack or checkpointed or in_backward():
        # Activation checkpointing that starts inside the block (recompute=True) replays the forward without
        # the block's hooks: one gather per read, in the forward as in the replay, so both save alike.
        return _BlockForward(None, src.site).read(plan)
    return outside_forward(plan)


def block_pre_forward(block: nn.Module, args: Any) -> None:
    """Forward pre-hook of a replaced block: open the record of this forward (FSDP-managed blocks only)."""
    if not fsdp_state.is_managed(block):
        return
    site = block._modules.get(SITE_ATTR)
    if site is not None:
        site.__dict__.setdefault(_ACTIVE, []).append(_BlockForward(block, site))


def block_post_forward(block: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of a replaced block: free the gathered tensors, to be gathered again for the backward."""
    site = block._modules.get(SITE_ATTR)
    stack = None if site is None else site.__dict__.get(_ACTIVE)
    if not stack:
        return
    record = stack.pop()
    if not stack:
        del site.__dict__[_ACTIVE]
    record.finish(output)


# --- one forward of a replaced block ----------------------------------------------------------------------


class _BlockForward:
    """The synthesized tensors of one forward of one replaced block, and their lifetime."""

    def __init__(self, block: nn.Module | None, site: nn.Module):
        self.block, self.site = block, site
        self.checkpointed = saved_tensor_hooks_active()  # the whole block runs under checkpointing
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        self.slots: dict[tuple[int, str], Slot] = {}  # the sampled weights among them
        self.gathers: list[Any] = []
        self.batched = False
        self.unit: Any = None  # the block's FSDP unit (known once a tensor is gathered)

    def read(self, plan: Plan) -> torch.Tensor:
        """The full tensor of ``plan`` (gathered at its first read), telling the sampled estimator who reads it
        (see :func:`~.fsdp_sampled.note_read`)."""
        key = (id(plan.leaf), plan.name)
        out = self.cache.get(key)
        if out is None:
            if plan.local and not self.batched and self.block is not None:
                self.batched = True
                self._gather_block(plan)
                out = self.cache.get(key)
            if out is None:
                out = self._gather_one(plan)
                self.cache[key] = out
        note_read(self.slots.get(key))
        return out

    def _gather_block(self, first: Plan) -> None:
        # Every tensor of the block that mixes on the same mesh and dtype as `first`, in one collective.
        plans = [p for p in block_plans(self.block, self.site) if _batchable(p, first)]
        self._gather_local(plans)

    def _gather_local(self, plans: list[Plan]) -> None:
        first = plans[0]
        self.unit = first.site_unit
        settings = checked_settings(first)
        coeffs = [coefficients(p) for p in plans]
        saved = [(a.detach().clone(), b.detach().clone()) for a, b in coeffs]  # FSDP frees a, b at reshard
        dtype = first.prev.param.dtype
        if settings.param_dtype is not None and dtype.is_floating_point:
            dtype = settings.param_dtype  # mixed in the shards' dtype, gathered in param_dtype
        recompute = lambda: [local_mix(p, a, b) for p, (a, b) in zip(plans, saved)]  # noqa: E731
        args = (*groups(first), dtype, settings.reduce_dtype, divide_factor(first, settings))
        if any(p.sampled is not None for p in plans):  # linear layers whose scalar gradient is sampled
            gather: Gather = SampledGather(plans, coeffs, *args, recompute=recompute)
        else:
            gather = Gather([p.prev.param.shape for p in plans], *args, recompute=recompute)
        scale = scalar_scale(first, settings)
        locals_ = [local_mix(p, ScaleGrad.apply(a, scale), ScaleGrad.apply(b, scale)) for p, (a, b) in zip(plans, coeffs)]
        fulls = GatherShards.apply(gather, *locals_, *gather.extra)
        self.gathers.append(gather)
        if isinstance(gather, SampledGather):
            gather.owned = self.block is not None  # else made for one read, announced after it
        for i, (p, full) in enumerate(zip(plans, fulls)):
            if p.sampled is not None:
                self.slots[(id(p.leaf), p.name)] = (gather, i)  # the layer's kernel hands its rows to the gather
            self.cache[(id(p.leaf), p.name)] = full

    def _gather_one(self, plan: Plan) -> torch.Tensor:
        if plan.local:  # a tensor the block scan did not batch (another mesh or dtype)
            self._gather_local([plan])
            return self.cache[(id(plan.leaf), plan.name)]
        self.unit = plan.site_unit
        settings = checked_settings(plan)
        computed = Computed(lambda: synthesize_gathered(plan, settings), plan.src.site)
        self.gathers.append(computed)
        return computed.run()

    def finish(self, output: Any) -> None:
        """End of the block's forward: free what the backward will gather again; tell the other ranks now
        (asynchronously) what the sampled gradient's collectives will carry."""
        self.cache.clear()
        self.slots.clear()
        if not self.gathers:
            return
        if announcing():
            for g in self.gathers:
                if isinstance(g, SampledGather):
                    g.announce()
        reshard = fsdp_state.unit_settings(self.unit).reshard_after_forward
        freed = [g for g in self.gathers if g.track and reshard]
        for g in self.gathers:
            if g not in freed:
                g.owners = []  # autograd (or nobody) holds the full tensors; they go when it lets go
        tensors = [t for t in _tensors(output) if t.requires_grad]
        if not freed:
            return
        for g in freed:
            g.free()
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(tensors, lambda _: [g.regather() for g in freed], mode="any")


def _batchable(p: Plan, first: Plan) -> bool:
    return p.local and p.mesh == first.mesh and p.prev.param.dtype == first.prev.param.dtype


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):
        for v in output.values():
            yield from _tensors(v)
    elif isinstance(output, (list, tuple)):
        for v in output:
            yield from _tensors(v)
