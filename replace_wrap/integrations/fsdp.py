"""Sharding converted models with FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per block.

The standard recipe works unchanged on a converted model: torchtitan's loop ::

    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

(or Accelerate's ``transformer_based_wrap``, or :func:`shard`, which is that loop over every stack). A replaced
block is a unit of its own holding only its scalars; its tensors are synthesized from the neighbours' *local
shards* (see :mod:`.fsdp_synthesis`) and all-gathered like an ordinary block's parameters, so at most the
computing block's tensors are unsharded and per-rank memory falls as 1/world as with plain FSDP. ``convert``
attaches the two forward hooks this needs to every replaced block; nothing else is called.

DDP needs nothing of this: every parameter of a converted model (neighbours and scalars included) takes part
in each forward, so ``DistributedDataParallel(model)`` works without ``find_unused_parameters``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import api
from ..errors import ConfigError, NotConvertedError
from ..surgery.apply import sites
from ..surgery.attachments import register_attachment
from . import fsdp_state, fsdp_synthesis

__all__ = ["fsdp_units", "shard"]


def fsdp_units(model: nn.Module) -> list[tuple[str, ...]]:
    """The module paths of the FSDP units :func:`shard` creates below the root: one per block of every stack.

    Kept for 0.1 code, which grouped each replaced block with its neighbours; a replaced block is now a unit
    of its own like any other block.

    Raises:
        NotConvertedError: If ``model`` is not converted.

    Example:
        >>> import torch, replace_wrap
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
        >>> replace_wrap.fsdp_units(replace_wrap.convert(net, every=2))
        [('0',), ('1',), ('2',), ('3',)]
    """
    return [(path,) for path in _block_paths(model)]


def shard(model: nn.Module, *, mesh: Any = None, **fully_shard_kwargs: Any) -> nn.Module:
    """Apply FSDP2 to a converted model the torchtitan way: one unit per block of every stack, then the root.

    The same as writing the loop yourself (``for block in stack: fully_shard(block, mesh=mesh, ...)``, then
    ``fully_shard(model, mesh=mesh, ...)``); a replaced block needs nothing more.

    Args:
        model: A converted model, not yet sharded.
        mesh: A 1-D ``DeviceMesh`` (FSDP) or a 2-D one (HSDP: replicate, shard); ``None`` is FSDP's default
            mesh over the whole world.
        **fully_shard_kwargs: Passed to every ``fully_shard`` call (``reshard_after_forward=``, ``mp_policy=``,
            ``offload_policy=``, ...).

    Returns:
        ``model``, now an FSDP module: train it as usual. To merge it, gather the full state dict into an
        unsharded converted model (see docs/distributed.md); :func:`replace_wrap.merge` refuses a sharded model.

    Raises:
        NotConvertedError: If ``model`` is not converted.
        ConfigError: If ``model`` (or a submodule) is already sharded, or ``mesh`` is not a 1-D or 2-D
            ``DeviceMesh``. The model is left as it was.

    Example:
        >>> # in each process, after torch.distributed.init_process_group(...)
        >>> # model = replace_wrap.shard(replace_wrap.convert(model, every=2), mesh=init_device_mesh("cuda", (8,)))
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard  # late: keeps `import replace_wrap` free of FSDP

    paths = _block_paths(model)
    if fsdp_state.managed_anywhere(model):
        raise ConfigError(
            f"{type(model).__name__} is already sharded (fully_shard was applied to it or to a submodule); "
            "replace_wrap.shard applies FSDP2 itself. Call it on the converted model before any fully_shard, "
            "or keep your own fully_shard loop: a converted model needs nothing more."
        )
    if mesh is not None and (not isinstance(mesh, DeviceMesh) or mesh.ndim not in (1, 2)):
        what = f"a {mesh.ndim}-D DeviceMesh" if isinstance(mesh, DeviceMesh) else type(mesh).__name__
        raise ConfigError(
            f"shard(mesh=...) needs a 1-D DeviceMesh (FSDP) or a 2-D one (HSDP: replicate, shard), got {what}. "
            "Build one with torch.distributed.device_mesh.init_device_mesh(device_type, (world_size,)); for a "
            "multi-dimensional mesh pass its data-parallel part, e.g. mesh['dp']."
        )
    if mesh is not None:
        fully_shard_kwargs["mesh"] = mesh
    for path in sorted(paths, key=lambda p: -p.count(".")):  # bottom-up, as FSDP requires for nested stacks
        fully_shard(model.get_submodule(path), **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def _block_paths(model: nn.Module) -> list[str]:
    rep = api.report(model)  # raises NotConvertedError
    if not rep.blocks:  # pragma: no cover - a report always lists the converted stacks' blocks
        raise NotConvertedError(f"{type(model).__name__} has no stacks to shard")
    return [b.path for b in sorted(rep.blocks, key=lambda b: (b.stack, b.index))]


# --- the attachment: the forward hooks of every replaced block --------------------------------------------


def _detach_hooks(model: nn.Module) -> None:
    # every module, not sites(model): merge restores the blocks (drops their sites) before detaching
    ours = (fsdp_synthesis.block_pre_forward, fsdp_synthesis.block_post_forward)
    for block in model.modules():
        for hooks in (block._forward_pre_hooks, block._forward_hooks):
            for key in [k for k, h in hooks.items() if h in ours]:
                del hooks[key]
                block._forward_hooks_always_called.pop(key, None)


@register_attachment("fsdp_hooks", detach=_detach_hooks)
def _attach_hooks(model: nn.Module, report: Any) -> None:
    # Cost without FSDP: one dictionary read per replaced block and forward.
    for _, block, _ in sites(model):
        block.register_forward_pre_hook(fsdp_synthesis.block_pre_forward)
        block.register_forward_hook(fsdp_synthesis.block_post_forward, always_call=True)
