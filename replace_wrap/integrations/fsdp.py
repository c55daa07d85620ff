"""Sharding converted models with FSDP2 (``torch.distributed.fsdp.fully_shard``).

A replaced block reads its neighbours' weights on every forward, and its backward needs them again. FSDP2
unshards a unit's parameters only around that unit's own forward and backward, so with one unit per block
the replaced block meets its neighbours' *sharded* parameters (``aten.native_layer_norm.default got mixed
torch.Tensor and DTensor``). The recipe: each replaced block shares one FSDP unit with both neighbours, so
the three are unsharded together. Triples that overlap (``every=2``: blocks 0-1-2 and 2-3-4 share block 2)
merge into one unit for the whole run; ``every=3`` gives disjoint units of three blocks. Blocks outside any
triple stay units of their own, and the root unit takes everything else (embeddings, head).

DDP needs nothing of this: every parameter of a converted model (neighbours and scalars included) takes part
in each forward, so ``DistributedDataParallel(model)`` works without ``find_unused_parameters``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import api

__all__ = ["fsdp_units", "shard"]


def fsdp_units(model: nn.Module) -> list[tuple[str, ...]]:
    """The module paths of the FSDP units a converted model needs, one tuple per unit, in stack order.

    Each replaced block is grouped with its previous and next block; overlapping groups merge. Every other
    block of a stack is a unit of its own.

    Raises:
        NotConvertedError: If ``model`` is not converted.

    Example:
        >>> import torch, replace_wrap
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)])
        >>> replace_wrap.fsdp_units(replace_wrap.convert(net, every=3))
        [('0',), ('1', '2', '3'), ('4', '5', '6'), ('7',)]
        >>> replace_wrap.fsdp_units(replace_wrap.convert(torch.nn.Sequential(
        ...     *[torch.nn.Linear(4, 4) for _ in range(6)]), every=2))
        [('0', '1', '2', '3', '4'), ('5',)]
    """
    rep = api.report(model)
    stacks: dict[str, list[Any]] = {}
    for b in rep.blocks:
        stacks.setdefault(b.stack, []).append(b)
    units: list[tuple[str, ...]] = []
    for blocks in stacks.values():
        blocks = sorted(blocks, key=lambda b: b.index)
        group_of = list(range(len(blocks)))  # block position -> first position of its unit
        for pos, b in enumerate(blocks):
            if b.status == "replaced":
                # the previous block was already placed; its unit absorbs this block and the next one
                group_of[pos] = group_of[pos + 1] = group_of[pos - 1]
        for start in dict.fromkeys(group_of):
            units.append(tuple(b.path for b, g in zip(blocks, group_of) if g == start))
    return units


def shard(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """Apply FSDP2 to a converted model with the units of :func:`fsdp_units`, then to the root; return it.

    Args:
        model: A converted model (before any ``fully_shard``).
        **fully_shard_kwargs: Passed to every ``fully_shard`` call (``mesh=``, ``reshard_after_forward=``,
            ``mp_policy=``, ...).

    Returns:
        ``model``, now an FSDP module: train it as usual. ``replace_wrap.merge`` needs the full (unsharded)
        state dict loaded into an unsharded model.

    Example:
        >>> # in each process, after torch.distributed.init_process_group(...)
        >>> # model = replace_wrap.shard(replace_wrap.convert(model, every=2), mesh=init_device_mesh("cpu", (2,)))
    """
    from torch.distributed.fsdp import fully_shard  # late: keeps `import replace_wrap` free of torch.distributed

    for unit in fsdp_units(model):
        modules = [model.get_submodule(p) for p in unit]
        fully_shard(modules if len(modules) > 1 else modules[0], **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
