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
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from .._compat import is_fx_symbolic_tracing
from ..errors import CompatibilityError
from ..integrations import fsdp_synthesis
from ..synthesis import builtin_kernels  # noqa: F401  registers the built-in layer kernels, in lookup order
from ..synthesis.adapt import adapt_pair
from ..synthesis.layer_kernels import kernel_for
from ..synthesis.mixing import (
    CACHE_PREFIX, SOURCES_ATTR, TensorSource, read_neighbour, reads_detached, refuse_hook_computed,
)
from .sources import CHECK, CopyRoot, check_copy, check_meta, check_subclass, copy_root, refuse_script

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
        if names:  # printing never synthesizes (see _extra_repr); torch.jit.script is refused, typed
            namespace["extra_repr"] = _extra_repr(base)
            namespace["__prepare_scriptable__"] = _prepare_scriptable
        namespace.update(
            forward=_forward(base, names, recompute),
            __setattr__=_setattr(base, names),
            _rw_base=base,
            # Not a torch.nn module for torch.fx, so that tracing enters its forward (see _fx_call_module). A
            # block swapped only for recompute keeps its own module name.
            __module__=__name__ if names else base.__module__,
            __qualname__=base.__qualname__,
            __reduce_ex__=_reduce_ex,
            __doc__=base.__doc__,
        )
        cls = type(base.__name__, (base,), namespace)
        _SWAPPED[key] = cls
    return cls


def _prepare_scriptable(self: nn.Module) -> nn.Module:
    site = next(iter(self.__dict__[SOURCES_ATTR].values())).site
    refuse_script(type(self).__name__, site)
    return self  # not reached


def _synthesized(name: str) -> Any:
    def fget(self: nn.Module) -> torch.Tensor:
        state = self.__dict__
        src = state[SOURCES_ATTR][name]
        if _PRINTING in state:  # inside extra_repr: a shape-only stand-in, nothing read or computed
            return _stand_in(src, name)
        if CHECK in state or "_is_replica" in state:  # a deep copy (checked once) or a DataParallel replica
            check_copy(self)
        sharded = fsdp_synthesis.synthesize(self, name, src)  # FSDP2 units: from the neighbours' shards
        if sharded is not None:
            return sharded
        if reads_detached(self):  # a row kernel runs the layer's own forward and routes the scalars' gradient
            with torch.no_grad():
                return _synthesize(self, src, name)
        return _synthesize(self, src, name)

    fget.__name__ = name
    return fget


def _synthesize(layer: nn.Module, src: TensorSource, name: str) -> torch.Tensor:
    """``site.synthesize`` of the neighbours' current ``name`` tensors (adapted to the replaced shape)."""
    try:
        return _mix(layer, src, name)
    except Exception as e:  # a neighbour quantized in place (a tensor subclass): say so, typed; else re-raise
        check_subclass(layer, e)
        raise


def _mix(layer: nn.Module, src: TensorSource, name: str) -> torch.Tensor:
    site, k, prev, nxt, prev_adapter, next_adapter = src
    refuse_hook_computed(src, name)  # as the layer kernels (mixing._own): a pre-hook's stale attribute
    if not src.adapted:  # same shapes: no adapter call, nothing allocated
        p, n = read_neighbour(prev, name), read_neighbour(nxt, name)
        if p.is_meta or n.is_meta:  # two flag reads on every synthesis; the check itself only on meta
            check_meta(layer, src, p, n)
        return site.synthesize(k, p, n)
    p = None if prev is None else read_neighbour(prev, name)
    n = None if nxt is None else read_neighbour(nxt, name)
    if (p is not None and p.is_meta) or (n is not None and n.is_meta):
        check_meta(layer, src, p, n)
    return site.synthesize(k, *adapt_pair(p, n, prev_adapter, next_adapter))


def _setattr(base: type, names: tuple[str, ...]) -> Any:
    # Assigning a synthesized name would fail inside torch (a Parameter: "attribute already exists"; a tensor:
    # the property has no setter) with nothing said about why or what to do instead.
    def __setattr__(self: nn.Module, name: str, value: Any) -> None:
        if name in names:
            site = self.__dict__[SOURCES_ATTR][name].site
            raise CompatibilityError(
                f"{name!r} of this replaced {base.__name__} (a layer of the block between {site.prev_path!r} and "
                f"{site.next_path!r}) is synthesized by replace_wrap from the neighbour blocks on every read "
                "(a * prev + b * next), so it cannot be assigned; in-place writes to it (zero_(), torch.nn.init, "
                ".data =) change a temporary and have no effect either. To give the layer its own "
                f"{name!r}, merge first (replace_wrap.merge(model)) or revert (convert with keep_original=True). "
                "torch.func.functional_call assigns every tensor it is given: give it the parameters and buffers "
                "({**dict(model.named_parameters()), **dict(model.named_buffers())}), what the synthesized "
                "tensors are made from, rather than a state_dict(), which holds their values too."
            )
        base.__setattr__(self, name, value)

    return __setattr__


_PRINTING = "_rw_printing"  # set on a layer while its extra_repr runs


def _extra_repr(base: type) -> Any:
    # A base extra_repr may read a synthesized tensor (LlamaRMSNorm prints weight.shape). Printing must not
    # synthesize: it would cost a weight per print and fail on a half-loaded model, e.g. inside accelerate's
    # own error message for a module it cannot load. The properties give shape-only meta stand-ins meanwhile.
    def extra_repr(self: nn.Module) -> str:
        object.__setattr__(self, _PRINTING, True)
        try:
            return base.extra_repr(self)
        except Exception:  # a base that reads values (meta has none): print without its details
            return f"synthesized: {', '.join(sorted(self.__dict__[SOURCES_ATTR]))}"
        finally:
            self.__dict__.pop(_PRINTING, None)

    return extra_repr


def _stand_in(src: TensorSource, name: str) -> torch.Tensor:
    """A meta tensor with the synthesized tensor's shape and dtype (no read of any value, no allocation)."""
    side = read_neighbour(src.prev, name) if src.prev is not None else read_neighbour(src.next, name)
    return torch.empty(src.shape(name), dtype=side.dtype, device="meta")


def _forward(base: type, names: tuple[str, ...], recompute: bool) -> Any:
    @functools.wraps(base.forward)  # keeps the base forward's signature for inspect.signature
    def run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not names:
            return base.forward(self, *args, **kwargs)
        if is_fx_symbolic_tracing():
            return _fx_call_module(self, base, args, kwargs)
        # The kernel is looked up per call (a cached dict read; the class fixes the key), so one registered
        # after this class was built serves it too.
        kernel = kernel_for(base, names)
        state = self.__dict__
        if CHECK in state or "_is_replica" in state:  # as in fget: a layer kernel reads the sources directly
            check_copy(self)
        try:
            if kernel is not None:
                out = kernel.forward(self, *args, **kwargs)
                if out is not NotImplemented:
                    return out
            return base.forward(self, *args, **kwargs)
        except Exception as e:  # a neighbour quantized in place (a tensor subclass): say so, typed; else re-raise
            check_subclass(self, e)
            raise

    if not recompute:
        return run

    try:  # where a cache argument sits when passed positionally (GPT-2: block(h, past_key_values, mask, ...))
        params = list(inspect.signature(base.forward).parameters)[1:]
    except (TypeError, ValueError):
        params = []
    at = {k: params.index(k) for k in _CACHE_KWARGS if k in params}

    @functools.wraps(base.forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            cache = next((k for k in _CACHE_KWARGS if kwargs.get(k) is not None
                          or (k in at and at[k] < len(args) and args[at[k]] is not None)), None)
            if cache is not None:
                # The block writes into the cache it is handed (an HF decoder called with use_cache=True, its
                # default also in training): a replay in the backward would write it a second time. Run the
                # block once instead, exactly, and say how to get the recomputation back.
                warnings.warn(
                    f"recompute=True: a replaced {base.__name__} was called with a cache ({cache}=...), so it is "
                    "not recomputed in this call (replaying it in the backward would write the cache twice). "
                    "Call the model with use_cache=False while training (or set model.config.use_cache = False) "
                    "to recompute it.", UserWarning, stacklevel=2,
                )
                return run(self, *args, **kwargs)
            from torch.utils.checkpoint import checkpoint

            return checkpoint(run, self, *args, use_reentrant=False, **kwargs)
        return run(self, *args, **kwargs)

    return forward


# Keyword arguments under which Hugging Face blocks receive the cache they write into (the names vary by model
# and version: decoder layers, GPT-2's blocks, Mamba's); a block called with one is not recomputed.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_params")


def _fx_call_module(layer: nn.Module, base: type, args: tuple, kwargs: dict) -> Any:
    """What ``torch.fx`` records for a replaced layer: the layer as a leaf, and the tensors it synthesizes from.

    A torch.nn layer is a leaf of an FX graph (a ``call_module`` node), and the GraphModule holds the same
    layer object, so it computes exactly what the converted model does. But a GraphModule only holds the
    modules and parameters its graph names, and nothing in a leaf call names the replaced block's scalars:
    they would be missing from ``gm.parameters()`` (no training) and ``gm.state_dict()`` (no saving). So the
    trace enters here (the swapped class is no torch.nn module for FX) and records the leaf call itself, plus a
    ``get_attr`` node for each tensor the layer synthesizes from (the scalars, the neighbours' tensors), which
    puts them in the GraphModule.
    """
    from torch.fx import Proxy

    found = [a for a in (*args, *kwargs.values()) if isinstance(a, Proxy)]
    if not found:  # called with constants: nothing to record, compute them (torch.fx would fold it anyway)
        return base.forward(layer, *args, **kwargs)
    tracer = found[0].tracer
    for name, src in layer.__dict__[SOURCES_ATTR].items():
        owners = [(src.site, n) for n, _ in src.site.named_parameters()]
        owners += [(m, name) for m in (src.prev, src.next) if m is not None]
        for module, attr in owners:
            try:
                path = tracer.path_of_module(module)
            except NameError:  # outside the traced root: the GraphModule shares the module anyway
                continue
            tracer.create_proxy("get_attr", f"{path}.{attr}" if path else attr, (), {})
    return tracer.create_proxy("call_module", tracer.path_of_module(layer), args, kwargs)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # Generated classes cannot be found by name; pickle and deepcopy rebuild them from (base, names, recompute).
    key = (type(self)._rw_base, tuple(sorted(self.__dict__.get(SOURCES_ATTR, ()))),
           bool(self.__dict__.get("_rw_recompute", False)), _CopyProbe())
    state = {k: v for k, v in self.__dict__.items() if not k.startswith(CACHE_PREFIX) and k != CHECK}
    return _rebuild, key, state


def _rebuild(base: type, names: tuple[str, ...], recompute: bool = False, root: Any = None) -> nn.Module:
    cls = _swapped_class(base, names, recompute)
    new = cls.__new__(cls)
    if names and isinstance(root, CopyRoot):  # a deep copy: check at first use that its neighbours came along
        object.__setattr__(new, CHECK, root)
    return new


class _CopyProbe:
    """The last argument of :func:`_rebuild`: the :class:`CopyRoot` of the deep copy it is part of.

    Copying a whole model copies each replaced layer's neighbours and site as part of it (the memo shares
    them), but copying one block alone would give it private copies of its neighbours that no model holds: a
    frozen snapshot that trains apart from the model. Whether the copy holds the neighbours is only known once
    the outermost copy is finished, so the copy keeps that object and checks before its first synthesis.

    ``copy.deepcopy`` copies a reduction's arguments through its memo, which is how the probe reaches it. A
    ``__deepcopy__`` method would do the same but is also found through a wrapper that forwards attribute reads
    to the module it holds (torch's ``CheckpointWrapper``): copying the wrapper then returned the layer alone.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> CopyRoot:
        return copy_root(memo)

    def __reduce__(self) -> tuple[Any, ...]:
        return _no_root, ()  # pickled: nothing to check (an unpickled model holds what it was saved with)


def _no_root() -> None:
    return None
