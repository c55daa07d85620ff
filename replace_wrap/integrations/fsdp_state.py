"""The one place that reads FSDP2's private state (``torch.distributed.fsdp._fully_shard``).

The sharded synthesis (:mod:`.fsdp_synthesis`) needs three facts FSDP2 keeps to itself: which FSDP unit
(parameter group) manages a module's parameter, that parameter's *sharded* DTensor whatever state its unit is
in (``FSDPParam.sharded_param``: when the unit is unsharded, ``module.<name>`` is the full tensor whose storage
FSDP frees at reshard), and the unit's settings (mixed precision, ``reshard_after_forward``, the gradient
divide factor). Every private name used is listed in :data:`PRIVATE_API` and checked by :func:`check`, which
``tests/test_fsdp.py`` runs on a sharded model: a torch release that renames one fails that test loudly, and at run time
the sharded synthesis raises :class:`~replace_wrap.ConfigError` naming the missing attribute instead of
computing something else.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MergeError

__all__ = [
    "MANAGED_FLAG",
    "PRIVATE_API",
    "ShardedParam",
    "UnitSettings",
    "all_units",
    "check",
    "fsdp1_holds",
    "held_values",
    "in_fsdp2_unit",
    "is_managed",
    "lookup",
    "managed_anywhere",
    "refuse_sharded",
    "sharded_by",
    "unit_settings",
    "unsharded_bytes",
    "wait_for_reduce",
]

# Set by fully_shard on every module whose parameters an FSDP unit manages (the unit's root included).
MANAGED_FLAG = "_is_fsdp_managed_module"

# The FSDP2 internals read here, by owner; check() verifies each on a live model.
PRIVATE_API = {
    "torch.distributed._composable_state": ("_module_state_mapping",),
    "FSDPState": ("_fsdp_param_groups",),
    "FSDPParamGroup": ("fsdp_params", "mp_policy", "post_forward_mesh_info", "gradient_divide_factor", "comm_ctx"),
    "FSDPCommContext": ("reduce_scatter_stream", "all_reduce_stream"),  # after the first forward
    "FSDPParam": ("_module_info", "sharded_param", "all_gather_outputs"),
    "ParamModuleInfo": ("module", "param_name", "shared_modules", "shared_param_names"),
}


@dataclass(frozen=True)
class ShardedParam:
    """An FSDP-managed parameter: its manager and the unit (parameter group) it belongs to."""

    fsdp_param: Any  # torch's FSDPParam
    unit: Any  # torch's FSDPParamGroup

    @property
    def param(self) -> nn.Parameter:
        """The sharded DTensor parameter (what the optimizer holds), whatever state the unit is in."""
        return self.fsdp_param.sharded_param


@dataclass(frozen=True)
class UnitSettings:
    """What the sharded synthesis takes from the unit of a replaced block."""

    param_dtype: torch.dtype | None  # cast before the all-gather (None: keep the parameter's dtype)
    reduce_dtype: torch.dtype | None  # reduce gradients in this dtype (None: the gradient's own)
    reshard_after_forward: bool  # free unsharded tensors after forward (re-gathered for the backward)
    divide_factor: float | None  # gradient divide factor (None: the data-parallel world size)


def is_managed(module: nn.Module | None) -> bool:
    """Whether FSDP manages ``module``'s parameters (a cheap attribute read): FSDP2, or FSDP1, which sets the
    same flag (:func:`in_fsdp2_unit` tells them apart)."""
    return module is not None and bool(module.__dict__.get(MANAGED_FLAG, False))


def managed_anywhere(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or any of its submodules."""
    return any(is_managed(m) for m in model.modules())


def in_fsdp2_unit(module: nn.Module) -> bool:
    """Whether an FSDP2 unit manages a parameter of ``module`` (FSDP1 sets the same managed flag, but flattens
    the parameters into its own: replace_wrap cannot read those)."""
    if module not in _INDEX:
        _reindex()
    return module in _INDEX


def fsdp1_holds(module: nn.Module, name: str) -> bool:
    """Whether FSDP1 (FullyShardedDataParallel) holds ``module.<name>`` as a view of its FlatParameter: a plain
    tensor attribute (``use_orig_params=False``), or a tensor marked ``_fsdp_flattened`` (``use_orig_params=True``,
    a plain tensor in ``_parameters`` during its forward). A parameter that FSDP2 leaves out of its units
    (``ignored_params``) is the module's own ``nn.Parameter``, and a parametrized one is no attribute at all."""
    t = module._parameters.get(name, module.__dict__.get(name))
    if not isinstance(t, torch.Tensor):
        return False
    return not isinstance(t, nn.Parameter) or bool(getattr(t, "_fsdp_flattened", False))


def sharded_by(model: nn.Module) -> str:
    """What shards ``model``, as messages name it: FSDP2, or FSDP1 (any other wrapper that sets torch's
    FSDP-managed flag on modules, but holds no parameter in an FSDP2 unit)."""
    if any(in_fsdp2_unit(m) for m in model.modules() if is_managed(m)):
        return "FSDP2"
    return "FSDP1 (FullyShardedDataParallel)"


def refuse_sharded(model: nn.Module, verb: str) -> None:
    """Raise a typed error if ``model`` is sharded, with FSDP2 or FSDP1 (``verb``: ``convert``, ``plan``, ``merge`` ...).

    Raises:
        MergeError: For ``merge`` / ``revert``: gather the state dict into an unsharded model first.
        ConfigError: For the other verbs: convert before ``fully_shard``.
    """
    if not managed_anywhere(model):
        return
    name, by = type(model).__name__, sharded_by(model)
    if verb in ("merge", "revert"):
        raise MergeError(
            f"cannot {verb} {name}: it is sharded with {by}, each rank holds only shards of its tensors; the "
            "model was left unchanged. Gather it first: on every rank call "
            "sd = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True)); then on rank 0 load sd into an unsharded copy of the "
            f"converted model (replace_wrap.convert with the same options) and {verb} that copy "
            "(docs/distributed.md)."
        )
    raise ConfigError(
        f"cannot {verb} {name}: it is already sharded with {by} (applied to it or to a submodule); the model "
        "was left unchanged. Convert the unsharded model first, then shard it with FSDP2 "
        "(replace_wrap.shard(model, mesh=...) or your own fully_shard loop)."
    )


def held_values(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as far as this rank holds them, without a collective; NaN for the rest.

    A plain tensor is returned as is; a meta tensor gives NaN. A DTensor sharded on dim 0 (an FSDP2 parameter
    outside its unit's forward, such as a replaced block's scalars) gives its full shape with this rank's shard
    filled in: rank 0 holds every block's scalars with the default ``scalars="block"``. Reports use this, so
    printing one on a single rank never waits for the others.
    """
    if t.is_meta:
        return torch.full(t.shape, float("nan"))
    to_local = getattr(t, "to_local", None)
    if to_local is None:
        return t
    from torch.distributed.tensor import Shard

    out = torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.to_local().device)
    local = to_local()
    if local.numel() and t.dim():
        start = 0
        for mesh_dim, p in enumerate(t.placements):
            if isinstance(p, Shard) and p.dim == 0:
                chunk = -(-t.shape[0] // t.device_mesh.size(mesh_dim))
                start = t.device_mesh.get_local_rank(mesh_dim) * chunk
        out[start : start + local.shape[0]] = local
    elif local.numel():
        out = local.clone()
    return out


# module -> {parameter name -> ShardedParam}; weak keys: an index of every FSDP2 unit alive in the process
_INDEX: weakref.WeakKeyDictionary[nn.Module, dict[str, ShardedParam]] = weakref.WeakKeyDictionary()


def all_units() -> list[Any]:
    """Every FSDP2 parameter group alive in this process."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError as exc:  # pragma: no cover - a torch without FSDP2 internals we know
        raise ConfigError(_unsupported(f"cannot import FSDP2 internals ({exc})")) from None
    units, seen = [], set()
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, FSDPState) and id(state) not in seen:
            seen.add(id(state))
            units.extend(_attr(state, "_fsdp_param_groups"))
    return units


def lookup(module: nn.Module, name: str) -> ShardedParam | None:
    """The FSDP manager of ``module.<name>``, or ``None`` if no FSDP2 unit manages it."""
    found = _INDEX.get(module)
    if found is None or name not in found:
        _reindex()
        found = _INDEX.get(module, {})
    return found.get(name)


def _reindex() -> None:
    for unit in all_units():
        for fp in _attr(unit, "fsdp_params"):
            info = _attr(fp, "_module_info")
            pairs = [(info.module, info.param_name), *zip(info.shared_modules, info.shared_param_names)]
            for mod, pname in pairs:
                _INDEX.setdefault(mod, {})[pname] = ShardedParam(fp, unit)


def unit_settings(unit: Any) -> UnitSettings:
    """The mixed-precision, resharding and gradient-division settings of one FSDP unit."""
    mp = _attr(unit, "mp_policy")
    return UnitSettings(
        param_dtype=mp.param_dtype,
        reduce_dtype=mp.reduce_dtype,
        reshard_after_forward=_attr(unit, "post_forward_mesh_info") is not None,
        divide_factor=_attr(unit, "gradient_divide_factor"),
    )


def unsharded_bytes(model: nn.Module | None = None) -> int:
    """Bytes of unsharded parameter storage FSDP2 holds now (in ``model``, or in every unit of the process)."""
    mods = None if model is None else set(model.modules())
    total = 0
    for unit in all_units():
        for fp in _attr(unit, "fsdp_params"):
            if mods is not None and _attr(fp, "_module_info").module not in mods:
                continue
            total += sum(t.untyped_storage().nbytes() for t in _attr(fp, "all_gather_outputs"))
    return total


def wait_for_reduce(unit: Any) -> None:
    """Make the current stream wait for the unit's pending gradient reduction (accelerators only).

    FSDP writes a unit's sharded gradients on its reduce-scatter stream (the all-reduce stream under HSDP); a
    gradient added to them from the current stream (a coupled neighbour's) must not race that write. Nothing
    to do on the CPU.
    """
    if not torch.accelerator.is_available():
        return
    ctx = _attr(unit, "comm_ctx")
    for name in PRIVATE_API["FSDPCommContext"]:
        stream = getattr(ctx, name, None)  # absent before the first forward: nothing pending then
        device = getattr(stream, "device", None)
        if device is not None and torch.device(device).type == torch.accelerator.current_accelerator().type:
            torch.accelerator.current_stream().wait_stream(stream)


def check(model: nn.Module) -> None:
    """Raise :class:`~replace_wrap.ConfigError` unless every attribute in :data:`PRIVATE_API` exists on ``model``'s units.

    ``model`` must have been passed to ``fully_shard``.
    """
    mods = set(model.modules())
    units = [u for u in all_units() if any(_attr(fp, "_module_info").module in mods for fp in _attr(u, "fsdp_params"))]
    if not units:
        raise ConfigError(_unsupported("no FSDP2 unit manages the model given to check()"))
    for unit in units:
        for name in PRIVATE_API["FSDPParamGroup"]:
            _attr(unit, name)
        for name in PRIVATE_API["FSDPCommContext"]:
            _attr(unit.comm_ctx, name)
        for fp in _attr(unit, "fsdp_params"):
            for name in PRIVATE_API["FSDPParam"]:
                _attr(fp, name)
            for name in PRIVATE_API["ParamModuleInfo"]:
                _attr(_attr(fp, "_module_info"), name)
            if not isinstance(fp.sharded_param, nn.Parameter) or not hasattr(fp.sharded_param, "to_local"):
                raise ConfigError(_unsupported("FSDPParam.sharded_param is no DTensor parameter"))


def _attr(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise ConfigError(_unsupported(f"{type(obj).__name__} has no attribute {name!r}")) from None


def _unsupported(what: str) -> str:
    return (
        f"replace_wrap's FSDP2 support does not know this torch {torch.__version__}: {what}. Sharding a "
        "replaced block by itself needs FSDP2's per-parameter state; use the torch version replace_wrap was "
        "tested with (2.14), or shard each stack of blocks as one unit (fully_shard(list(model.layers), mesh=mesh)), in "
        "which the replaced blocks read their neighbours unsharded."
    )
