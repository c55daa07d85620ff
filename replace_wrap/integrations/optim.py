"""Rebinding optimizers across a conversion: ``convert(model, optimizers=opt)`` and ``merge(..., optimizers=opt)``.

An optimizer built before the conversion still holds the tensors that ``convert`` removes (they no longer get
gradients, so it keeps their state for nothing) and not the new scalars (so they never learn), without any
error; after ``merge`` the same holds the other way round (dead scalars, restored tensors missing).
Rebinding fixes both in place, as Composer's surgery does: every removed tensor leaves every parameter group
(and the optimizer's state), and each block's new tensors join the group that held the first of that block's
removed ones. A block whose tensors the optimizer did not hold (a frozen part of the model) gets none of its
new tensors in it either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["as_optimizers", "check_holds", "rebind"]


def as_optimizers(optimizers: Any) -> list[Any]:
    """``optimizers`` as a list, validated (``None`` -> ``[]``); raise ConfigError for anything else."""
    if optimizers is None:
        return []
    items = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
    for i, opt in enumerate(items):
        groups = getattr(opt, "param_groups", None)
        well_formed = isinstance(groups, list) and all(isinstance(g, dict) and "params" in g for g in groups)
        if not well_formed or not hasattr(opt, "state"):
            raise ConfigError(
                f"optimizers[{i}] is a {type(opt).__name__}, not a torch.optim.Optimizer (param_groups and state "
                "expected); pass the optimizer(s) that train the model, or create them after convert"
            )
    return items


def check_holds(
    optimizers: Sequence[Any], removed: Sequence[nn.Parameter], what: str = "the tensors that convert removes"
) -> None:
    """Raise ConfigError, before anything changes, if an optimizer holds none of the ``removed`` tensors."""
    ids = {id(p) for p in removed}
    for i, opt in enumerate(optimizers):
        if not any(id(p) in ids for g in opt.param_groups for p in g["params"]):
            raise ConfigError(
                f"optimizers[{i}] ({type(opt).__name__}) holds none of {what}, so it does not train the "
                "replaced blocks: pass the optimizer that trains this model, or create the optimizer afterwards"
            )


Removed = list[nn.Parameter]
Added = list[tuple[str, nn.Parameter]]


def rebind(optimizers: Sequence[Any], blocks: Sequence[tuple[Removed, Added]]) -> None:
    """Move each optimizer from the removed tensors to the scalars, in place.

    Args:
        optimizers: Validated by :func:`as_optimizers`.
        blocks: Per replaced block, its removed parameters and its new ``(name, parameter)`` scalars (names are
            full module paths, used where a group keeps ``param_names``).
    """
    for opt in optimizers:
        removed = {id(p) for old, _ in blocks for p in old}
        targets = []  # (group, scalars) decided before the groups change
        for old, new in blocks:
            group = next((g for p in old for g in opt.param_groups if any(q is p for q in g["params"])), None)
            if group is not None:
                targets.append((group, new))
        for group in opt.param_groups:
            keep = [k for k, p in enumerate(group["params"]) if id(p) not in removed]
            if "param_names" in group:  # torch >= 2.6 keeps names when built from named_parameters()
                group["param_names"] = [group["param_names"][k] for k in keep]
            group["params"] = [group["params"][k] for k in keep]
        for old, _ in blocks:
            for p in old:
                opt.state.pop(p, None)
        for group, new in targets:
            group["params"].extend(p for _, p in new)
            if "param_names" in group:
                group["param_names"].extend(n for n, _ in new)

