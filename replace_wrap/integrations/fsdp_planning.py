"""Planning the sharded synthesis of one tensor, and its maths on local shards.

A :class:`Plan` says how one synthesized tensor of a replaced layer is computed when its neighbours are
FSDP2-managed in other units than the replaced block: mixed on the local shards (``local``), or synthesized
from the gathered neighbours (another shape, a rule with its own synthesis). See :mod:`.fsdp_synthesis`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..synthesis.adapt import adapt_pair
from ..synthesis.layer_kernels import kernel_for
from ..synthesis.mixing import CACHE_PREFIX, SOURCES_ATTR, TensorSource
from ..synthesis.maths import mix
from ..synthesis.rules import IntegrationRule, get_rule
from . import fsdp_state
from .fsdp_collectives import Gather, GatherShards, ScaleGrad
from .fsdp_state import ShardedParam, UnitSettings

__all__ = [
    "Plan",
    "block_plans",
    "checked_settings",
    "coefficients",
    "divide_factor",
    "groups",
    "local_mix",
    "outside_forward",
    "plan_for",
    "scalar_scale",
    "synthesize_gathered",
]

_TOLD: set[str] = set()  # reasons the sampled estimator steps aside, already warned about in this process
_logger = logging.getLogger("replace_wrap")
_PLANS = CACHE_PREFIX + "fsdp_plans"  # on a replaced layer: tensor name -> Plan or _ORDINARY
_ORDINARY = object()  # the plan of a tensor the ordinary getter serves (no neighbour in another unit)


@dataclass(frozen=True)
class Plan:
    """How one synthesized tensor of a replaced layer is computed under FSDP2."""

    leaf: nn.Module
    name: str
    src: TensorSource
    prev: ShardedParam | None
    next: ShardedParam | None
    site_unit: Any
    local: bool  # mix on the local shards (else gather the neighbours)
    mesh: Any  # the neighbours' DeviceMesh
    shard_dim: int  # the mesh dimension that shards dim 0
    replicate_dims: tuple[int, ...]  # HSDP: mesh dimensions holding replicas
    sampled: str | None = None  # the layer kernel's sharded layout: its scalar gradient is sampled (fsdp_sampled)


# --- planning ---------------------------------------------------------------------------------------------


def plan_for(leaf: nn.Module, name: str, src: TensorSource) -> Plan | None:
    """The (cached) plan of ``leaf.<name>``; ``None`` when the ordinary getter is right (one unit for all)."""
    plans = leaf.__dict__.setdefault(_PLANS, {})
    plan = plans.get(name)
    if plan is None:
        plan = plans[name] = _make_plan(leaf, name, src) or _ORDINARY
    return None if plan is _ORDINARY else plan


def _make_plan(leaf: nn.Module, name: str, src: TensorSource) -> Plan | None:
    site = src.site
    prev = fsdp_state.lookup(src.prev, name) if fsdp_state.is_managed(src.prev) else None
    nxt = fsdp_state.lookup(src.next, name) if fsdp_state.is_managed(src.next) else None
    for side, held in ((src.prev, prev), (src.next, nxt)):
        # FSDP1 sets the managed flag too; FSDP2 sets it on a module whose parameters it ignores (ignored_params)
        # but keeps for its buffers: only a tensor FSDP1 flattened is refused
        if held is None and fsdp_state.is_managed(side) and fsdp_state.fsdp1_holds(side, name):
            raise ConfigError(
                f"the neighbours of a replaced block ({site.prev_path!r}, {site.next_path!r}) are wrapped by FSDP1 "
                "(FullyShardedDataParallel), which flattens their parameters into its own: a replaced block "
                "synthesizes from neighbours sharded by FSDP2 only. Shard the converted model with FSDP2: "
                "replace_wrap.shard(model, mesh=...) or fully_shard on every block and the root (accelerate: "
                "fsdp_version=2; Lightning: ModelParallelStrategy); docs/distributed.md."
            )
    site_params = [sp for p in site._parameters if (sp := fsdp_state.lookup(site, p)) is not None]
    if not site_params:
        raise ConfigError(
            f"the neighbours of a replaced block ({site.prev_path!r}, {site.next_path!r}) are sharded with "
            "FSDP2, but the block's scalars are in no FSDP unit, so their gradient would not be averaged "
            "across ranks. Apply fully_shard to the replaced block too, and to the model root "
            "(or use replace_wrap.shard(model, mesh=...))."
        )
    site_unit = site_params[0].unit  # a site's parameters share their block's unit
    if all(sp is None or sp.unit is site_unit for sp in (prev, nxt)):
        return None  # one unit unshards the neighbours and the block together: the ordinary getter is right
    rule = get_rule(site.rule)
    if type(rule).init_buffers is not IntegrationRule.init_buffers:
        raise ConfigError(
            f"rule {site.rule!r} keeps state (buffers) that follows the neighbours' full tensors; it is not "
            f"supported when a replaced block ({site.prev_path!r} -> {site.next_path!r}) and its neighbours "
            "are different FSDP2 units. Use rule='linear' or 'convex', or put the stack in one FSDP unit."
        )
    ref = prev if prev is not None else nxt
    mesh, placements = ref.param.device_mesh, tuple(ref.param.placements)
    if site_params[0].param.device_mesh != mesh:
        raise ConfigError(
            f"the replaced block after {site.prev_path!r} is sharded on another device mesh than its neighbours; "
            "shard every block of a stack on the same mesh."
        )
    shard_dim, replicate_dims = _fsdp_placements(placements, leaf, name)
    if ref.param.to_local().device.type != mesh.device_type:
        raise ConfigError(
            f"the neighbours of the replaced block after {site.prev_path!r} keep their shards on "
            f"{ref.param.to_local().device.type} but communicate on {mesh.device_type} (an FSDP OffloadPolicy); "
            "synthesizing from offloaded shards is not supported: drop offload_policy for the stack's blocks."
        )
    local = (
        prev is not None
        and nxt is not None
        and src.prev_adapter is None
        and src.next_adapter is None
        and bool(getattr(site, "linear_mix", False))
        and prev.param.shape == nxt.param.shape
        and prev.param.dim() >= 1
        and prev.param.dtype == nxt.param.dtype
        and nxt.param.device_mesh == mesh
        and tuple(nxt.param.placements) == placements
    )
    sampled = _sampled_layout(leaf, name, site, local)
    return Plan(leaf, name, src, prev, nxt, site_unit, local, mesh, shard_dim, replicate_dims, sampled)


def _sampled_layout(leaf: nn.Module, name: str, site: nn.Module, local: bool) -> str | None:
    """The layout the sampled estimator reads ``leaf.<name>`` in, or ``None`` when its scalar gradient is exact.

    Decided from the layer's type and the site's settings alone, so every rank decides alike (the sampled
    gradient takes other collectives than the exact one). A layer whose kernel would sample without sharding
    but cannot here is named in a warning (once per reason and process): an option that cannot apply says so.
    """
    if not (site.fast_path and site.detach and getattr(site, "ab_grad_sample", None) is not None):
        return None  # exact by the user's choice, which the report already says
    names = tuple(sorted(leaf.__dict__.get(SOURCES_ATTR, {})))
    kernel = kernel_for(type(leaf).__dict__.get("_rw_base", type(leaf)), names)
    if kernel is None or kernel.requires[:1] != (name,) or (kernel.check is not None and kernel.check(leaf)):
        return None  # the generic path without sharding too (the report says why)
    if not kernel.exact:  # a sampling-only kernel (RMS norms: per-channel tensors) steps aside under FSDP2 by
        return None  # design, unwarned: their exact gradients ride in the rows' all-gather (docs/distributed.md)
    if kernel.sharded is None:
        why = f"kernel {kernel.name!r} has no estimator for sharded neighbours"
    elif not local:
        why = "its neighbours are gathered in full (another shape or rule)"
    else:
        return kernel.sharded
    if why not in _TOLD:
        _TOLD.add(why)
        _logger.warning(
            "replace_wrap: under FSDP2, %s of the replaced block after %r takes the generic path with the exact "
            "scalar gradient (ab_grad_sample=%r does not apply): %s (docs/distributed.md)",
            type(leaf).__name__, site.prev_path, site.ab_grad_sample, why,
        )
    return None


def _fsdp_placements(placements: tuple[Any, ...], leaf: nn.Module, name: str) -> tuple[int, tuple[int, ...]]:
    from torch.distributed.tensor import Replicate, Shard

    shard = [d for d, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    if len(shard) != 1 or any(not isinstance(p, (Replicate, Shard)) for p in placements) or any(
        isinstance(p, Shard) and p.dim != 0 for p in placements
    ):
        raise ConfigError(
            f"the neighbours of {type(leaf).__name__}.{name} are sharded as {placements}; the sharded synthesis "
            "supports FSDP2's Shard(0) (FSDP or HSDP meshes). Drop shard_placement_fn for the stack's blocks."
        )
    return shard[0], tuple(d for d, p in enumerate(placements) if isinstance(p, Replicate))


def block_plans(block: nn.Module, site: nn.Module) -> list[Plan]:
    """The plans of every tensor ``site`` synthesizes in ``block``, in an order every rank shares."""
    plans = []
    for leaf in block.modules():
        for name, src in sorted(leaf.__dict__.get(SOURCES_ATTR, {}).items()):
            if src.site is site and (fsdp_state.is_managed(src.prev) or fsdp_state.is_managed(src.next)):
                plan = plan_for(leaf, name, src)
                if plan is not None:
                    plans.append(plan)
    return plans


# --- the maths on shards ----------------------------------------------------------------------------------


def coefficients(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    # The same selection as IntegrationRule.synthesize, so the mix equals the single-process one bit for bit.
    site, k = plan.src.site, plan.src.k
    a, b = site.coefficients()
    if a.numel() > 1 or plan.prev.param.dim() == 0:
        i = site.index_of(k)
        a, b = a[i], b[i]
    return a, b


def local_mix(plan: Plan, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    p, n = plan.prev.param.to_local(), plan.next.param.to_local()
    if plan.src.site.detach:
        p, n = p.detach(), n.detach()
    else:
        p, n = ScaleGrad.apply(p, 1.0, plan.prev.unit), ScaleGrad.apply(n, 1.0, plan.next.unit)
    return mix(a, b, p, n)


def checked_settings(plan: Plan) -> UnitSettings:
    settings = fsdp_state.unit_settings(plan.site_unit)
    if not plan.src.site.detach:  # a coupled neighbour's gradient lands in its unit's sharded gradient
        for sp in (plan.prev, plan.next):
            if sp is not None and fsdp_state.unit_settings(sp.unit).divide_factor != settings.divide_factor:
                raise ConfigError(
                    f"the replaced block after {plan.src.site.prev_path!r} and its neighbour use different FSDP "
                    "gradient divide factors; with neighbour_grad='coupled' its gradient reaches the neighbour's "
                    "sharded gradient, so set_gradient_divide_factor must be the same on every unit of the stack."
                )
    return settings


def groups(plan: Plan) -> tuple[Any, list[Any]]:
    mesh = plan.mesh
    return mesh.get_group(plan.shard_dim), [mesh.get_group(d) for d in plan.replicate_dims]


def scalar_scale(plan: Plan, settings: UnitSettings) -> float:
    # FSDP divides the scalars' summed gradient by F; each replica group holds the full sum once per replica.
    replicas = math.prod(plan.mesh.size(d) for d in plan.replicate_dims)
    return divide_factor(plan, settings) / replicas


def divide_factor(plan: Plan, settings: UnitSettings) -> float:
    if settings.divide_factor is not None:
        return float(settings.divide_factor)
    return float(math.prod(plan.mesh.size(d) for d in (plan.shard_dim, *plan.replicate_dims)))


def synthesize_gathered(plan: Plan, settings: UnitSettings) -> torch.Tensor:
    """The slow exact path: gather each neighbour in full, synthesize as without FSDP."""
    src, site = plan.src, plan.src.site

    def full(sp: ShardedParam | None, module: nn.Module | None) -> torch.Tensor | None:
        if module is None:
            return None
        if sp is None:  # a neighbour FSDP does not manage: its own full tensor
            return getattr(module, plan.name)
        local = sp.param.to_local()
        local = local.detach() if site.detach else ScaleGrad.apply(local, 1.0, sp.unit)
        own = fsdp_state.unit_settings(sp.unit)
        gather = Gather([sp.param.shape], *groups(plan), local.dtype, own.reduce_dtype, divide_factor(plan, own))
        (out,) = GatherShards.apply(gather, local)
        return out

    p, n = full(plan.prev, src.prev), full(plan.next, src.next)
    out = site.synthesize(src.k, *adapt_pair(p, n, src.prev_adapter, src.next_adapter))
    if settings.param_dtype is not None and out.is_floating_point():
        out = out.to(settings.param_dtype)
    return out


def outside_forward(plan: Plan) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Replicate

    if not plan.local:
        raise ConfigError(
            f"{type(plan.leaf).__name__}.{plan.name} of the replaced block after {plan.src.site.prev_path!r} "
            "is synthesized from gathered neighbours (another shape or rule); under FSDP2 it can be read only "
            "inside the block's forward. For full weights, gather the state dict (see docs/distributed.md)."
        )
    rep = [Replicate()] * plan.mesh.ndim

    def replicated(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, DTensor):
            return t.redistribute(plan.mesh, rep) if t.device_mesh == plan.mesh else DTensor.from_local(
                t.full_tensor(), plan.mesh, rep, run_check=False)
        return DTensor.from_local(t, plan.mesh, rep, run_check=False)

    a, b = (replicated(c) for c in coefficients(plan))
    p, n = plan.prev.param, plan.next.param
    if plan.src.site.detach:
        p, n = p.detach(), n.detach()
    return a.to(p.dtype) * p + b.to(n.dtype) * n
