"""Parameter-integration hooks: make a replaced block compute with synthesized weights.

A replaced tensor is removed from its module's ``_parameters`` (so it is no parameter of the model: no memory,
no optimizer state, no gradient) and the module's class is swapped for a cached subclass in which that name is
a property. Reading ``module.weight`` then returns ``site.synthesize(k, prev.weight, next.weight)``, computed
afresh on every access from the neighbour modules' *current* tensors, so it follows ``.to()``,
``load_state_dict`` and optimizer steps, and nothing synthesized outlives the backward pass.

Why not ``torch.nn.utils.parametrize``: it keeps the original tensor as a parameter, which defeats the
purpose. Why not forward pre-hooks that assign tensors: the assigned tensor would stay alive between steps
and be missing outside forward. The subclass keeps the base class's name, so ``isinstance``, ``repr`` and
name-based checks in user code still see the original type.

Two things may also override ``forward`` in the swapped class. For leaf types with a registered leaf handler
(:mod:`replace_wrap.leaves`: ``nn.Linear``, ``nn.ConvNd``) the handler computes the layer with a lean backward;
every tensor keeps its property, so reading ``leaf.weight`` still works. And a replaced block with
``recompute=True`` runs under ``torch.utils.checkpoint``, so its activations are recomputed in the backward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adapt import ShapeAdapter, adapt_pair
from .leaves import CACHE_PREFIX, handler_for
from .rules import IntegrationRule, get_rule

__all__ = ["ReplacementSite", "base_class", "install", "is_swapped", "set_recompute", "uninstall"]

SITE_ATTR = "replacement"  # attribute under which a replaced block holds its ReplacementSite

# (base class, fused names, recompute) -> generated subclass; shared by every module with the same layout.
_SWAPPED: dict[tuple[type, tuple[str, ...], bool], type] = {}


class ReplacementSite(nn.Module):
    """The learnable scalars of one replaced block.

    Registered on the block as ``block.replacement``; its parameters (``a`` and ``b`` for the linear rule) are
    the only learnable parameters of the site and stay fp32 whatever dtype the model is cast to.

    Args:
        rule: Name of the integration rule.
        n_sets: Number of scalar sets: 1 (``scalars="block"``) or the number of synthesized tensors.
        init: Initial ``(a, b)`` of every set (the config's ``init``).
        tensor_names: Paths of the synthesized tensors inside the block, in scalar-set order.
        detach: Detach the neighbours' tensors inside the synthesis (``neighbour_grad="detached"``).
        prev_path: Path of the previous block (for reports).
        next_path: Path of the next block (for reports).
        originals: Frozen copies of the replaced tensors (``keep_original=True``), kept as buffers.
        coefficients: Per-set initial ``(a, b)``, each of shape ``(n_sets,)``, overriding ``init`` (a policy's
            :meth:`~replace_wrap.Policy.initial_scalars`); mapped to the rule's parameters by
            :meth:`~replace_wrap.IntegrationRule.params_from_coefficients`.
        own: The block's own tensors at conversion, for rules that start their state from them.
    """

    def __init__(
        self,
        rule: str,
        n_sets: int,
        init: tuple[float, float],
        tensor_names: tuple[str, ...],
        detach: bool,
        prev_path: str,
        next_path: str,
        originals: list[torch.Tensor] | None = None,
        coefficients: tuple[torch.Tensor, torch.Tensor] | None = None,
        own: Sequence[torch.Tensor] = (),
        fast_path: bool = True,
        ab_grad_sample: float | None = None,
    ):
        super().__init__()
        self.rule = rule
        self._rule = get_rule(rule)
        if coefficients is None:
            params = self._rule.init_params(n_sets, init)
        else:
            params = self._rule.params_from_coefficients(*coefficients)
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value.detach().to(torch.float32)))
        self.n_sets = n_sets
        self.tensor_names = tuple(tensor_names)
        self.detach = detach
        self.fast_path = fast_path
        self.ab_grad_sample = ab_grad_sample
        # Leaf handlers compute with (a, b) directly; a rule with its own synthesis (a non-linear map, or
        # per-tensor state like 'ema') keeps the generic path.
        self.linear_mix = (
            type(self._rule).synthesize is IntegrationRule.synthesize
            and type(self._rule).synthesize_tensor is IntegrationRule.synthesize_tensor
        )
        self.prev_path, self.next_path = prev_path, next_path
        self.has_originals = originals is not None
        for i, t in enumerate(originals or []):
            self.register_buffer(f"original_{i}", t.detach().clone())
        for name, value in self._rule.init_buffers(self, list(own)).items():
            self.register_buffer(name, value)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Identity: a block that is an ``nn.Sequential`` calls every child, the site included."""
        return x

    def index_of(self, k: int) -> int:
        """Scalar set used by the ``k``-th synthesized tensor."""
        return k if self.n_sets > 1 else 0

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(a, b)``, each of shape ``(n_sets,)``."""
        return self._rule.coefficients(self)

    def synthesize(self, k: int, prev: torch.Tensor, next: torch.Tensor) -> torch.Tensor:
        """The ``k``-th synthesized tensor (``tensor_names[k]``) from the neighbours' current tensors."""
        if self.detach:
            prev, next = prev.detach(), next.detach()
        return self._rule.synthesize_tensor(self, k, prev, next)

    def _apply(self, fn: Any, recurse: bool = True) -> ReplacementSite:
        # The scalars stay fp32 when the model is cast (model.half(), .to(torch.bfloat16)): a bf16 scalar
        # cannot express small updates. Devices still follow; buffers (originals) follow the model's dtype.
        fp32 = {n: p.detach().clone() for n, p in self._parameters.items() if p is not None}
        super()._apply(fn, recurse)
        for n, p in self._parameters.items():
            if p is not None and p.dtype != torch.float32:
                p.data = fp32[n].to(p.device)
        return self

    def extra_repr(self) -> str:
        a, b = (t.detach().float() for t in self.coefficients())
        ab = f"a={a.item():.4g}, b={b.item():.4g}" if a.numel() == 1 else f"a.mean={a.mean():.4g}, b.mean={b.mean():.4g}"
        return f"rule={self.rule!r}, tensors={len(self.tensor_names)}, {ab}, prev={self.prev_path!r}, next={self.next_path!r}"


def is_swapped(module: nn.Module) -> bool:
    """Whether ``module`` has synthesized tensors installed."""
    return "_rw_sources" in module.__dict__


def base_class(module: nn.Module) -> type:
    """The module's original class (its own class if it is not swapped)."""
    return type(module).__dict__.get("_rw_base", type(module))


# (site, tensor position k, prev leaf, next leaf, prev adapter, next adapter) of one synthesized tensor
Source = tuple[ReplacementSite, int, nn.Module | None, nn.Module | None, ShapeAdapter | None, ShapeAdapter | None]


def install(leaf: nn.Module, sources: dict[str, Source]) -> None:
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
    object.__setattr__(leaf, "_rw_sources", dict(sources))
    for name in names:
        del leaf._parameters[name]
    _reclass(leaf)


def uninstall(leaf: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Undo :func:`install`: restore the base class and register ``params`` in the original order."""
    order = leaf.__dict__["_rw_order"]
    del leaf.__dict__["_rw_sources"], leaf.__dict__["_rw_order"]
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
    names = tuple(sorted(module.__dict__.get("_rw_sources", ())))
    recompute = bool(module.__dict__.get("_rw_recompute", False))
    module.__class__ = _swapped_class(base, names, recompute) if names or recompute else base


def _swapped_class(base: type, names: tuple[str, ...], recompute: bool = False) -> type:
    key = (base, names, recompute)
    cls = _SWAPPED.get(key)
    if cls is None:
        namespace: dict[str, Any] = {name: property(_synthesized(name)) for name in names}
        handler = handler_for(base, names) if names else None
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
        site, k, prev, nxt, prev_adapter, next_adapter = self._rw_sources[name]
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
    key = (type(self)._rw_base, tuple(sorted(self.__dict__.get("_rw_sources", ()))),
           bool(self.__dict__.get("_rw_recompute", False)))
    state = {k: v for k, v in self.__dict__.items() if not k.startswith(CACHE_PREFIX)}  # caches are rebuilt
    return _rebuild, key, state


def _rebuild(base: type, names: tuple[str, ...], recompute: bool = False) -> nn.Module:
    cls = _swapped_class(base, names, recompute)
    return cls.__new__(cls)
