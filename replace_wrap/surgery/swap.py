"""The class swap: make the layers of a replaced block compute with synthesized tensors.

A replaced tensor is removed from its module's ``_parameters`` (so it is no parameter of the model: no memory,
no optimizer state, no gradient) and the module's class is swapped for a cached subclass in which that name is
a property. Reading ``module.weight`` then returns ``site.synthesize(k, prev.weight, next.weight)``, computed
afresh on every access from the neighbour modules' *current* tensors, so it follows ``.to()``,
``load_state_dict`` and optimizer steps, and nothing synthesized outlives the backward pass.

Why not ``torch.nn.utils.parametrize``: it keeps the original tensor as a parameter, which defeats the
purpose. Why not forward pre-hooks that assign tensors: the assigned tensor would stay alive between steps
and be missing outside forward. The subclass keeps the base class's name, so ``isinstance``, ``repr`` and
name-based checks in user code still see the original type.

Two things may also override ``forward`` in the swapped class. For layer types with a registered layer kernel
(:mod:`replace_wrap.synthesis.layer_kernels`: ``nn.Linear``, ``nn.ConvNd``) the kernel computes the layer with a
lean backward; every tensor keeps its property, so reading ``layer.weight`` still works. And a replaced block with
``recompute=True`` runs under ``torch.utils.checkpoint``, so its activations are recomputed in the backward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..integrations import fsdp_synthesis
from ..synthesis.adapt import adapt_pair
from ..synthesis.layer_kernels import CACHE_PREFIX, SOURCES_ATTR, TensorSource, kernel_for

__all__ = ["base_class", "install", "is_swapped", "set_recompute", "uninstall"]

# (base class, fused names, recompute) -> generated subclass; shared by every module with the same layout.
_SWAPPED: dict[tuple[type, tuple[str, ...], bool], type] = {}


def is_swapped(module: nn.Module) -> bool:
    """Whether ``module`` has synthesized tensors installed."""
    return SOURCES_ATTR in module.__dict__


def base_class(module: nn.Module) -> type:
    """The module's original class (its own class if it is not swapped)."""
    return type(module).__dict__.get("_rw_base", type(module))


def install(leaf: nn.Module, sources: dict[str, TensorSource]) -> None:
    """Remove ``leaf``'s parameters named in ``sources`` and synthesize them on access.

    ``sources[name] = (site, k, prev_leaf, next_leaf, prev_adapter, next_adapter)``: ``leaf.<name>`` becomes
    ``site.synthesize(k, prev_leaf.<name>, next_leaf.<name>)``, ``k`` being the tensor's position in
    ``site.tensor_names``, each side first mapped by its adapter when it has one (another shape; an absent
    side, whose leaf is ``None``, gives zeros). Undo with :func:`uninstall`.
    """
    if is_swapped(leaf):
        raise RuntimeError(f"{type(leaf).__name__} already has synthesized tensors")  # internal invariant
    names = tuple(sorted(sources))
    object.__setattr__(leaf, "_rw_order", tuple(leaf._parameters))
    object.__setattr__(leaf, SOURCES_ATTR, dict(sources))
    for name in names:
        del leaf._parameters[name]
    _reclass(leaf)


def uninstall(leaf: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Undo :func:`install`: restore the base class and register ``params`` in the original order."""
    order = leaf.__dict__["_rw_order"]
    del leaf.__dict__[SOURCES_ATTR], leaf.__dict__["_rw_order"]
    for key in [k for k in leaf.__dict__ if k.startswith(CACHE_PREFIX)]:
        del leaf.__dict__[key]
    _reclass(leaf)
    current = dict(leaf._parameters)
    current.update(params)
    leaf._parameters.clear()
    for name in order:  # state_dict key order is the original one again
        if name in current:
            leaf._parameters[name] = current.pop(name)
    leaf._parameters.update(current)


def set_recompute(module: nn.Module, on: bool) -> None:
    """Run ``module``'s forward under ``torch.utils.checkpoint`` when gradients are recorded (or stop).

    Only the module's inputs are kept for the backward, which replays the forward (with the same random
    state) to get the rest. Works whether or not ``module`` also has synthesized tensors.
    """
    if on:
        object.__setattr__(module, "_rw_recompute", True)
    else:
        module.__dict__.pop("_rw_recompute", None)
    _reclass(module)


def _reclass(module: nn.Module) -> None:
    # The class follows the instance's state: synthesized names and the recompute flag.
    base = type(module).__dict__.get("_rw_base", type(module))
    names = tuple(sorted(module.__dict__.get(SOURCES_ATTR, ())))
    recompute = bool(module.__dict__.get("_rw_recompute", False))
    module.__class__ = _swapped_class(base, names, recompute) if names or recompute else base


def _swapped_class(base: type, names: tuple[str, ...], recompute: bool = False) -> type:
    key = (base, names, recompute)
    cls = _SWAPPED.get(key)
    if cls is None:
        namespace: dict[str, Any] = {name: property(_synthesized(name)) for name in names}
        handler = kernel_for(base, names) if names else None
        if handler is not None or recompute:
            namespace["forward"] = _forward(base, handler.forward if handler else None, recompute)
        namespace.update(
            _rw_base=base,
            __module__=base.__module__,
            __qualname__=base.__qualname__,
            __reduce_ex__=_reduce_ex,
            __doc__=base.__doc__,
        )
        cls = type(base.__name__, (base,), namespace)
        _SWAPPED[key] = cls
    return cls


def _synthesized(name: str) -> Any:
    def fget(self: nn.Module) -> torch.Tensor:
        src = self.__dict__[SOURCES_ATTR][name]
        sharded = fsdp_synthesis.synthesize(self, name, src)  # FSDP2 units: from the neighbours' shards
        if sharded is not None:
            return sharded
        site, k, prev, nxt, prev_adapter, next_adapter = src
        if prev_adapter is None and next_adapter is None:  # same shapes: no adapter call, nothing allocated
            return site.synthesize(k, getattr(prev, name), getattr(nxt, name))
        p = None if prev is None else getattr(prev, name)
        n = None if nxt is None else getattr(nxt, name)
        return site.synthesize(k, *adapt_pair(p, n, prev_adapter, next_adapter))

    fget.__name__ = name
    return fget


def _forward(base: type, handler: Any, recompute: bool) -> Any:
    @functools.wraps(base.forward)  # keeps the base forward's signature for inspect.signature
    def run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if handler is not None:
            out = handler(self, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return base.forward(self, *args, **kwargs)

    if not recompute:
        return run

    @functools.wraps(base.forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(run, self, *args, use_reentrant=False, **kwargs)
        return run(self, *args, **kwargs)

    return forward


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # Generated classes cannot be found by name; pickle and deepcopy rebuild them from (base, names, recompute).
    key = (type(self)._rw_base, tuple(sorted(self.__dict__.get(SOURCES_ATTR, ()))),
           bool(self.__dict__.get("_rw_recompute", False)))
    state = {k: v for k, v in self.__dict__.items() if not k.startswith(CACHE_PREFIX)}  # caches are rebuilt
    return _rebuild, key, state


def _rebuild(base: type, names: tuple[str, ...], recompute: bool = False) -> nn.Module:
    cls = _swapped_class(base, names, recompute)
    return cls.__new__(cls)
