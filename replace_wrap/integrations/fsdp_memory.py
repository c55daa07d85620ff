"""Per-rank memory of a model under FSDP2, computed from its shapes: will it fit on N accelerators?

:func:`fsdp_memory` applies FSDP2's layout rules to a model that is not sharded (a meta-device model works:
nothing is allocated) for the units :func:`replace_wrap.shard` creates, one per block of every stack plus the
root. FSDP2 shards each parameter on dim 0 in ``torch.chunk`` rows (``ceil(rows / world)`` per rank, the last
ranks holding fewer or none, every chunk padded to the first one's for the collectives); the fullest rank is
rank 0, and it is what this reports. Parameters, gradients and optimizer state are sharded; a unit's
parameters are unsharded (padded, in ``param_dtype``) while it computes, and the root's for the whole step
(FSDP does not reshard the root after forward). A replaced block's unit unshards its synthesized tensors
(the neighbours' shapes) and its scalars.

``tests/test_fsdp.py`` checks every field against what FSDP2 really holds on a rank at small scale
(``prefetch=0``: on the CPU, gloo completes each all-gather before the next unit starts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import api
from ..errors import NothingToReplaceError, NotConvertedError
from ..surgery.apply import site_tensors, sites
from . import fsdp_state

__all__ = ["FSDPMemory", "fsdp_memory"]


@dataclass(frozen=True)
class FSDPMemory:
    """Bytes on the fullest rank of a model sharded with FSDP2, one unit per block plus the root.

    Attributes:
        world_size: Ranks sharding the model.
        params: Sharded parameters, in their own dtype.
        grads: Sharded gradients of the trainable parameters (their dtype).
        optimizer: Optimizer state (``optimizer_states`` tensors per trainable parameter; AdamW keeps 2).
        unsharded_peak: Highest unsharded parameter bytes: the root plus ``1 + prefetch`` of the largest unit.
        root: Unsharded bytes of the root unit.
        largest_unit: Unsharded bytes of the largest block unit.
    """

    world_size: int
    params: int
    grads: int
    optimizer: int
    unsharded_peak: int
    root: int
    largest_unit: int

    @property
    def total(self) -> int:
        """Parameters, gradients, optimizer state and the unsharded peak (activations not included)."""
        return self.params + self.grads + self.optimizer + self.unsharded_peak


def fsdp_memory(
    model: nn.Module,
    world_size: int,
    *,
    param_dtype: torch.dtype | None = None,
    optimizer_states: int = 2,
    prefetch: int = 1,
) -> FSDPMemory:
    """Per-rank bytes of ``model`` sharded over ``world_size`` ranks as :func:`replace_wrap.shard` shards it.

    Works on an unsharded model, converted or not, with frozen parameters or not (a frozen parameter has no
    gradient or optimizer state); build it on the meta device to plan a model that does not fit anywhere.

    Args:
        model: The model, not yet sharded.
        world_size: Ranks of the (1-D) data-parallel mesh.
        param_dtype: ``MixedPrecisionPolicy.param_dtype`` (the dtype of unsharded parameters); ``None``: their own.
        optimizer_states: Optimizer tensors per trainable parameter (AdamW 2, SGD with momentum 1).
        prefetch: Units unsharded ahead of the computing one (1 on accelerators, where FSDP2 overlaps the next
            all-gather; 0 on the CPU with gloo).

    Raises:
        ConfigError: If ``model`` is already sharded.

    Example:
        >>> import torch, replace_wrap
        >>> with torch.device("meta"):
        ...     net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(6)])
        >>> e2e = replace_wrap.fsdp_memory(net, 8)
        >>> rw = replace_wrap.fsdp_memory(replace_wrap.convert(net, every=2), 8)
        >>> round(rw.optimizer / e2e.optimizer, 3)
        0.667
    """
    fsdp_state.refuse_sharded(model, "plan the memory of")
    blocks = [model.get_submodule(p) for p in _block_paths(model)]
    in_block = {id(p) for b in blocks for p in b.parameters()}
    params = grads = optimizer = 0
    for p in model.parameters():
        local = _chunk_rows(p.shape, world_size) * _inner(p.shape) * p.element_size()
        params += local
        if p.requires_grad:
            grads += local
            optimizer += optimizer_states * local
    root = sum(_unsharded(p.shape, p.dtype, world_size, param_dtype) for p in model.parameters() if id(p) not in in_block)
    synthesized = {id(block): site_tensors(block, site) for _, block, site in sites(model)}
    largest = 0
    for b in blocks:
        unit = sum(_unsharded(p.shape, p.dtype, world_size, param_dtype) for p in b.parameters())
        with torch.no_grad():
            for layer, name in synthesized.get(id(b), ()):
                t = getattr(layer, name)  # the neighbours' shape (meta: nothing computed)
                unit += _unsharded(t.shape, t.dtype, world_size, param_dtype)
        largest = max(largest, unit)
    return FSDPMemory(world_size, params, grads, optimizer, root + (1 + prefetch) * largest, root, largest)


def _block_paths(model: nn.Module) -> list[str]:
    try:
        rep = api.report(model)
    except NotConvertedError:  # not converted: the blocks of the stacks convert would see
        try:
            rep = api.plan(model, trace=False)
        except NothingToReplaceError as exc:  # no stack: one unit, the root
            rep = exc.report
    return [] if rep is None else [b.path for b in rep.blocks]


def _chunk_rows(shape: torch.Size, world: int) -> int:
    return math.ceil(shape[0] / world) if len(shape) else 1


def _inner(shape: torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) else 1


def _unsharded(shape: torch.Size, dtype: torch.dtype, world: int, param_dtype: torch.dtype | None) -> int:
    # FSDP2 all-gathers every rank's padded chunk: world * ceil(rows / world) rows, in param_dtype
    size = (param_dtype or dtype).itemsize if (param_dtype is not None and dtype.is_floating_point) else dtype.itemsize
    return world * _chunk_rows(shape, world) * _inner(shape) * size
