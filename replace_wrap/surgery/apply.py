"""Rewriting a model by a :class:`~replace_wrap.surgery.plan.Plan`, and undoing it (merge, revert).

:func:`apply_plan` is atomic: every step registers its undo, and any failure undoes them all, so the model is
exactly as it was. :func:`restore_block` is the inverse used by ``merge`` (synthesized values) and ``revert``
(the kept originals).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable

import torch
from torch import nn

from ..analysis.wrappers import key_path
from ..config import ReplaceConfig
from ..errors import CompatibilityError, ConfigError
from ..integrations.fsdp_state import held_values
from ..synthesis.mixing import SOURCES_ATTR, TensorSource
from ..synthesis.rules import state_frozen
from . import swap
from .plan import Plan, Target
from .site import SITE_ATTR, ReplacementSite

__all__ = ["apply_plan", "located_tensors", "neighbour_tensors", "restore_block", "scalar_values", "site_tensors", "sites"]


def sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, ReplacementSite]]:
    """``(path, block, site)`` of every replaced block of ``model``, in module order."""
    for path, block in model.named_modules():
        site = block._modules.get(SITE_ATTR)
        if isinstance(site, ReplacementSite):
            yield path, block, site


def site_tensors(block: nn.Module, site: ReplacementSite) -> list[tuple[nn.Module, str]]:
    """``(layer, name)`` of each synthesized tensor of a replaced block, in ``site.tensor_names`` order.

    ``layer`` is the module that synthesizes the tensor. It is the module at the recorded path, or, when a
    wrapper took that place after ``convert`` (PEFT's LoRA layers hold the original layer as ``base_layer``),
    the module inside the wrapper that synthesizes it for this site.
    """
    return [(layer, name) for _, layer, name in located_tensors(block, site)]


def located_tensors(block: nn.Module, site: ReplacementSite) -> list[tuple[str, nn.Module, str]]:
    """``(key, layer, name)`` of each synthesized tensor: its state-dict key relative to ``block`` where its
    layer is now (``site.tensor_names`` unless a wrapper moved the layer, e.g.
    ``self_attn.q_proj.base_layer.weight`` under a LoRA layer), and the layer and name that synthesize it.

    The key is the one torch writes: without the segments that wrappers' state-dict hooks drop
    (``fc1._checkpoint_wrapped_module.weight`` is ``fc1.weight``, see :mod:`~replace_wrap.analysis.wrappers`)."""
    out = []
    for rel in site.tensor_names:
        layer_path, _, name = rel.rpartition(".")
        found = None
        try:
            layer = block.get_submodule(layer_path) if layer_path else block
        except AttributeError:  # the layer was deleted from the block after convert
            layer = None
        for sub, module in layer.named_modules() if layer is not None else ():
            source = module.__dict__.get(SOURCES_ATTR, {}).get(name)
            if source is not None and source.site is site:
                found, layer_path = module, ".".join(p for p in (layer_path, sub) if p)
                break
        if found is None:
            _refuse_changed_layer(site, rel, layer)
        out.append((key_path(block, f"{layer_path}.{name}" if layer_path else name, tensor=True), found, name))
    return out


def _refuse_changed_layer(site: ReplacementSite, rel: str, layer: nn.Module | None) -> None:
    # Module surgery inside a replaced block after convert (timm's reparameterize_model fuses and deletes its
    # layers, freeze_batch_norm_2d swaps its norms): the block no longer holds the layer that synthesizes ``rel``,
    # so neither a state dict nor a merge can say what the block computes from its scalars.
    what = "was deleted" if layer is None else f"is now a {type(layer).__name__} that does not synthesize it"
    raise CompatibilityError(
        f"the replaced block between {site.prev_path!r} and {site.next_path!r} no longer holds the layer that "
        f"synthesizes {rel!r}: the layer {what} (module surgery after convert, e.g. timm's "
        "reparameterize_model or freeze_batch_norm_2d, or a layer assigned anew), so neither a state dict nor a "
        "merge can describe the block any more. Change the modules before convert, or after "
        "replace_wrap.merge(model); this model was changed in place: build or load it again (its last "
        "checkpoint, replace_wrap.load), merge, then apply the change."
    )


def scalar_values(site: ReplacementSite) -> dict[str, list[float]]:
    """The site's current ``(a, b)`` as plain floats, for reports."""
    a, b = (held_values(t.detach()) for t in site.coefficients())  # FSDP2 / meta: no collective, NaN if not here
    return {"a": [float(v) for v in a.float().flatten()], "b": [float(v) for v in b.float().flatten()]}


def apply_plan(model: nn.Module, plan: Plan, cfg: ReplaceConfig, undo: list[Callable[[], None]]) -> None:
    """Rewrite every target of ``plan``, appending each step's undo to ``undo`` (the caller runs them on failure)."""
    for t in plan.targets:
        site = _make_site(t, cfg)
        block = t.candidate.block
        block.add_module(SITE_ATTR, site)
        undo.append(lambda b=block: b._modules.pop(SITE_ATTR))
        by_layer: dict[int, tuple[nn.Module, dict[str, TensorSource]]] = {}
        for k, f in enumerate(t.candidate.match.synthesized):
            by_layer.setdefault(id(f.layer), (f.layer, {}))[1][f.name] = TensorSource(
                site, k, f.prev_layer, f.next_layer, f.prev_adapter, f.next_adapter
            )
        for layer, sources in by_layer.values():
            saved = {name: layer._parameters[name] for name in sources}
            swap.install(layer, sources)
            undo.append(lambda layer=layer, saved=saved: swap.uninstall(layer, saved))
        if cfg.recompute:
            swap.set_recompute(block, True)
            undo.append(lambda b=block: swap.set_recompute(b, False))
        _check_synthesis(t, site, cfg.rule)


def _make_site(t: Target, cfg: ReplaceConfig) -> ReplacementSite:
    c = t.candidate
    own = [f.layer._parameters[f.name] for f in c.match.synthesized]
    site = ReplacementSite(
        cfg.rule,
        c.n_sets,
        cfg.constant_init,
        tuple(f.rel for f in c.match.synthesized),
        detach=cfg.neighbour_grad == "detached",
        prev_path=c.prev_path,
        next_path=c.next_path,
        originals=own if cfg.keep_original else None,
        coefficients=t.coefficients,
        own=own,
        fast_path=cfg.fast_path,
        ab_grad_sample=None if cfg.ab_grad_sample == 1.0 else cfg.ab_grad_sample,
    ).to(own[0].device)
    site.requires_grad_flags = tuple(p.requires_grad for p in own)
    return site


def _check_synthesis(t: Target, site: ReplacementSite, rule: str) -> None:
    """A rule must synthesize each tensor in the shape and dtype it replaces: checked once, at conversion."""
    block, path = t.candidate.block, t.candidate.path
    with torch.no_grad(), state_frozen():
        for f, (layer, name) in zip(t.candidate.match.synthesized, site_tensors(block, site)):
            value = getattr(layer, name)
            # the replaced tensor's shape; its dtype is the neighbours' (a side may be absent, not both)
            ref = getattr(f.prev_layer if f.prev_layer is not None else f.next_layer, f.name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != f.shape or value.dtype != ref.dtype:
                got = (
                    f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, torch.Tensor)
                    else type(value).__name__
                )
                raise ConfigError(
                    f"rule {rule!r} synthesized {got} for tensor {f.rel!r} of block {path!r}, which needs "
                    f"shape {f.shape}, dtype {ref.dtype}; fix the rule's synthesize(). The model was "
                    "left unchanged."
                )


def neighbour_tensors(layer: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters ``name`` of the neighbour layers that replaced ``layer.<name>`` is synthesized from (an
    absent side, or a neighbour whose tensor is computed, as by a parametrization, has none)."""
    src = layer.__dict__.get(SOURCES_ATTR, {}).get(name)
    sides = () if src is None else (src.prev, src.next)
    return [m._parameters[name] for m in sides if m is not None and isinstance(m._parameters.get(name), nn.Parameter)]


def restore_block(
    block: nn.Module, site: ReplacementSite, tensors: list[tuple[nn.Module, str, torch.Tensor]]
) -> None:
    """Make ``tensors`` (``(layer, name, value)``) the block's own parameters again and drop the site."""
    flags = getattr(site, "requires_grad_flags", (True,) * len(tensors))
    by_layer: dict[int, tuple[nn.Module, dict[str, nn.Parameter]]] = {}
    for (layer, name, value), flag in zip(tensors, flags):
        by_layer.setdefault(id(layer), (layer, {}))[1][name] = nn.Parameter(value, requires_grad=flag)
    for layer, params in by_layer.values():
        swap.uninstall(layer, params)
    swap.set_recompute(block, False)
    del block._modules[SITE_ATTR]
