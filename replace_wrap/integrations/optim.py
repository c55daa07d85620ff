"""Rebinding optimizers across a conversion: ``convert(model, optimizers=opt)`` and ``merge(..., optimizers=opt)``.

An optimizer built before the conversion still holds the tensors that ``convert`` removes (they no longer get
gradients, so it keeps their state for nothing) and not the new scalars (so they never learn), without any
error; after ``merge`` the same holds the other way round (dead scalars, restored tensors missing).
Rebinding fixes both in place, as Composer's surgery does: every removed tensor leaves every parameter group
(and the optimizer's state), and each block's new tensors join the group that held the first of that block's
removed ones, in its place (the group keeps ``model.parameters()`` order, so a checkpoint of the optimizer, whose
states torch matches by position, loads into one built afterwards). A block whose tensors the optimizer did not hold (a frozen part of the model) gets none of its
new tensors in it either.

Weight decay: a replaced block's scalars never join a decayed group. When the block's group decays, they join
a group with ``weight_decay=0`` and otherwise the same options (Hugging Face's and timm's optimizers have one),
or a new such group is added (and logged: a learning-rate scheduler built before it does not see it). On
``merge``, a restored tensor takes the weight decay its neighbour blocks' same tensor has in the optimizer (the
usual convention where it holds neither: two or more dimensions, not a norm's or a bias); a decayed one goes
from the scalars' no-decay group to the decayed group with the same other options, or to a new one with the
optimizer's weight decay (logged; timm's layer-wise lr decay has no decayed group for a block that held only
its scalars). From the scalars' group of ``param_groups`` (whose options, a ``scalar_lr``, are theirs alone) it
joins its neighbours' group (:func:`beside_neighbours`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["SCALARS_GROUP", "as_optimizers", "beside_neighbours", "check_holds", "group_of", "rebind"]

logger = logging.getLogger("replace_wrap")


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


# The name of the scalars' own group that replace_wrap.param_groups makes: its options (a scalar_lr) are the
# scalars' alone, so merge trains a restored tensor in its neighbours' group instead (see beside_neighbours).
SCALARS_GROUP = "replace_wrap.scalars"

# place(optimizer, group that held the block's scalars, name, tensor) -> the group a restored tensor joins
Place = Callable[[Any, dict[str, Any], str, nn.Parameter], dict[str, Any]]


def rebind(optimizers: Sequence[Any], blocks: Sequence[tuple[Removed, Added]], place: Place | None = None) -> None:
    """Move each optimizer from the removed tensors to the new ones, in place.

    Args:
        optimizers: Validated by :func:`as_optimizers`.
        blocks: Per replaced block, its removed parameters and its new ``(name, parameter)`` tensors (names are
            full module paths, used where a group keeps ``param_names``).
        place: Where a new tensor goes, given the group that held its block's removed tensors. ``None``: that
            group, or its no-decay twin (``convert``: the new tensors are scalars); ``merge`` passes
            :func:`beside_neighbours`.
    """
    for opt in optimizers:
        removed = {id(p) for old, _ in blocks for p in old}
        # Each new tensor that joins its block's group takes the place of the block's first removed tensor there,
        # so the group lists the model's tensors in the order of model.parameters(), as a group built afterwards
        # would: torch's Optimizer.load_state_dict matches states by position, and a checkpoint of the rebound
        # optimizer then resumes into one built after convert or merge (appended, the states went to other
        # tensors of the same shapes). One in another group (a no-decay twin, the neighbours') is appended there.
        inline: dict[int, Added] = {}  # id(first removed tensor) -> the new tensors that take its place
        appended: list[tuple[dict[str, Any], str, nn.Parameter]] = []
        for old, new in blocks:
            anchor, group = next(((p, g) for p in old if (g := group_of(opt, p)) is not None), (None, None))
            if group is None:
                continue
            for name, p in new:
                dest = _group_for(opt, group, False) if place is None else place(opt, group, name, p)
                if dest is group:
                    inline.setdefault(id(anchor), []).append((name, p))
                else:
                    appended.append((dest, name, p))
        for group in opt.param_groups:
            names = group.get("param_names")  # torch >= 2.6 keeps names when built from named_parameters()
            params, kept_names = [], []
            for k, p in enumerate(group["params"]):
                entries = inline.get(id(p), ()) if id(p) in removed else ((None if names is None else names[k], p),)
                for name, q in entries:
                    params.append(q)
                    kept_names.append(name)
            group["params"] = params
            if names is not None:
                group["param_names"] = kept_names
        for old, _ in blocks:
            for p in old:
                opt.state.pop(p, None)
        for dest, name, p in appended:
            dest["params"].append(p)
            if "param_names" in dest:
                dest["param_names"].append(name)


def group_of(opt: Any, tensor: nn.Parameter | None) -> dict[str, Any] | None:
    """The parameter group of ``opt`` that holds ``tensor`` (by identity), or ``None``."""
    return next((g for g in opt.param_groups if any(q is tensor for q in g["params"])), None)


def beside_neighbours(
    neighbours: dict[str, list[nn.Parameter]], convention: Callable[[str, nn.Parameter], bool]
) -> Place:
    """``merge``'s ``place``: a restored tensor trains with the options of the group that held its block's
    scalars (a block's own options, as timm's layer-wise lr decay gives it) and the weight decay its neighbour
    blocks' same tensor has in that optimizer (the user's choice: one group that decays everything decays the
    restored biases and norms too; ``convention`` where the optimizer holds neither neighbour's tensor). From
    :data:`SCALARS_GROUP`, whose options are the scalars' alone, it joins its neighbours' group.

    Args:
        neighbours: Per restored tensor's name, the neighbour blocks' parameters of the same name.
        convention: ``convention(name, tensor)``: the usual rule (two or more dimensions, not a norm's or a bias).
    """
    def place(opt: Any, group: dict[str, Any], name: str, tensor: nn.Parameter) -> dict[str, Any]:
        held = next((g for g in (group_of(opt, q) for q in neighbours.get(name, ())) if g is not None), None)
        if held is not None and group.get("name") == SCALARS_GROUP:
            return held
        decays = convention(name, tensor) if held is None else bool(held.get("weight_decay", 0.0))
        return _group_for(opt, group, decays)

    return place


def _options(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ("params", "param_names", "weight_decay")}


def _group_for(opt: Any, group: dict[str, Any], decay: bool) -> dict[str, Any]:
    """The group a new tensor joins: ``group`` itself, unless that would decay a tensor that must not be
    decayed (a scalar), or leave undecayed one that was decayed before conversion (a restored weight)."""
    wd = group.get("weight_decay", 0.0)
    if bool(wd) == decay:
        return group
    for other in opt.param_groups:
        if bool(other.get("weight_decay", 0.0)) == decay and _options(other) == _options(group):
            return other
    if decay:
        # merge: no decayed group with these options (timm's layer-wise lr decay: a replaced block held only
        # its scalars, in its layer's no-decay group); the optimizer's weight decay, in a new group, as a fresh
        # optimizer would have it. Several weight decays: none can be chosen, so the tensor stays, and it says so
        decayed = {other["weight_decay"] for other in opt.param_groups if other.get("weight_decay", 0.0)}
        if len(decayed) != 1:
            if decayed:
                logger.warning(
                    "replace_wrap: a restored weight of a merged block stays in a group of %s without weight decay "
                    "(the optimizer's groups decay by %s, none with this group's other options); build the "
                    "optimizer again after merge to choose.", type(opt).__name__, sorted(decayed),
                )
            return group
        return _twin(opt, group, decayed.pop(), "the merged blocks' restored weights (their scalars' group decays by 0)")
    return _twin(opt, group, 0.0, f"the replaced blocks' scalars (their block's group decays by {wd})")


def _twin(opt: Any, group: dict[str, Any], weight_decay: float, whom: str) -> dict[str, Any]:
    """Add (and log) a group with ``group``'s options and ``weight_decay``; return it."""
    twin = {**{k: v for k, v in group.items() if k not in ("params", "param_names")},
            "weight_decay": weight_decay, "params": []}
    if "param_names" in group:
        twin["param_names"] = []
    opt.add_param_group(twin)
    logger.warning(
        "replace_wrap: added a parameter group with weight_decay=%s to %s for %s; a learning-rate scheduler "
        "created before this does not see the new group: create schedulers after convert and merge, or build the "
        "optimizer with replace_wrap.param_groups(model).",
        weight_decay if weight_decay else 0, type(opt).__name__, whom,
    )
    return opt.param_groups[-1]
