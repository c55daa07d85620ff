"""Layer kernels: fast forwards for the layers of replaced blocks, registered by module type.

A replaced layer reads its synthesized tensors through properties (see :mod:`replace_wrap.surgery.swap`); that
generic path works for every module but pays, in the backward, a full weight-gradient product just to get the
two scalar gradients. A *layer kernel* computes the layer's forward knowing that its weight is
``a * W_prev + b * W_next`` (see :mod:`replace_wrap.synthesis.kernels`).

Lookup: kernels are tried in registration order and the first match wins. The built-ins are registered in
:mod:`replace_wrap.synthesis.builtin_kernels`, in this order: ``nn.Linear``, ``nn.Conv1d`` / ``nn.Conv2d`` /
``nn.Conv3d``, and Hugging Face's ``transformers.pytorch_utils.Conv1D`` (named by its import path, so that
nothing here imports transformers); kernels registered later by users come after them, so a user kernel serves
layer types the built-ins do not claim. The lookup happens when a layer runs (cached per registry state), so
a kernel registered after a model was converted serves it too.

A kernel serves a class when the class is (a subclass of) one of its types and overrides nothing that the type
runs: a subclass that redefines ``forward``, ``_conv_forward`` or any other method of the type (a LoRA or
quantized linear, a convolution with its own padding) computes something else and keeps the generic path. Only
methods that run at construction (``__init__``, ``reset_parameters``, ``extra_repr``, ...) may differ. A kernel
may also decline a single call by returning ``NotImplemented`` (then the base class's forward runs with the
property path); the built-ins decline when :func:`mix_source` says so (``fast_path=False``, a rule that is not
a linear mix, meta tensors), under ``torch.no_grad`` (nothing to save, the generic
path is as fast) and for inputs or settings they do not cover (unbatched convolution input, string padding,
non-zero padding modes). :func:`layer_route` says in advance which path a layer takes, for reports.

Example:
    >>> import torch
    >>> kernel_for(torch.nn.Linear, ("bias", "weight")).name
    'linear'
    >>> kernel_for(torch.nn.LayerNorm, ("bias", "weight")) is None
    True
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..errors import RegistryError
from ..integrations.fsdp_state import is_managed
from .adapt import adapt_pair
from .estimators import describe_sample

__all__ = [
    "CACHE_PREFIX",
    "SOURCES_ATTR",
    "LayerKernel",
    "MixSource",
    "TensorSource",
    "generic_only",
    "kernel_for",
    "layer_route",
    "list_layer_kernels",
    "mix_source",
    "register_layer_kernel",
]

KernelFn = Callable[..., Any]
SHARDED_LAYOUTS = (None, "out_in", "in_out")  # LayerKernel.sharded

# The contract between a replaced layer and its kernels. The surgery stores, in the layer's __dict__ under
# SOURCES_ATTR, one TensorSource per synthesized tensor name; kernels read them through mix_source().
SOURCES_ATTR = "_rw_sources"
CACHE_PREFIX = "_rw_cache_"  # layer attributes with this prefix are caches: not pickled, dropped on uninstall


class TensorSource(NamedTuple):
    """Where one synthesized tensor of a replaced layer comes from.

    ``layer.<name>`` is ``site.synthesize(k, prev.<name>, next.<name>)``, each side first mapped by its adapter
    when it has one (another shape; an absent side, whose layer is ``None``, gives zeros).
    """

    site: nn.Module  # the block's ReplacementSite (duck-typed: synthesis does not import surgery)
    k: int  # position of the tensor in site.tensor_names
    prev: nn.Module | None  # the previous block's layer holding the same-named tensor
    next: nn.Module | None
    prev_adapter: Any = None  # replace_wrap.synthesis.adapt.ShapeAdapter or None (same shape)
    next_adapter: Any = None

    @property
    def adapted(self) -> bool:
        """Whether either side is mapped to the replaced tensor's shape (else both are used as they are)."""
        return self.prev_adapter is not None or self.next_adapter is not None


# Methods a subclass may redefine and still be served: they run when the layer is built or printed, not in
# its forward.
_CONSTRUCTION = frozenset({
    "__init__", "__repr__", "__setstate__", "extra_repr", "reset_parameters", "_reset_parameters",
    "_load_from_state_dict", "_save_to_state_dict",
})


def _computing_methods(t: type) -> frozenset[str]:
    """Names of the methods and properties ``t`` (or a base below ``nn.Module``) defines that may run in forward."""
    names = set()
    for cls in t.__mro__:
        if cls is nn.Module or not issubclass(cls, nn.Module):
            continue
        names.update(
            n for n, v in vars(cls).items()
            if (callable(v) or isinstance(v, (property, staticmethod, classmethod))) and n not in _CONSTRUCTION
        )
    return frozenset(names)


def _resolve(t: type | str) -> type | None:
    """A served type, or the class a ``"package.module.Class"`` path names once its module is imported."""
    if isinstance(t, type):
        return t
    module, _, name = t.rpartition(".")
    found = getattr(sys.modules.get(module), name, None)  # never imports: a class exists only once imported
    return found if isinstance(found, type) else None


@dataclass(frozen=True)
class LayerKernel:
    """A fast forward for layers of the given types.

    Attributes:
        name: Unique name (for errors and listings).
        types: The module types served (subclasses too, unless they redefine a method the type runs), or
            import paths ``"package.module.Class"`` of types resolved once their module is imported.
        requires: Tensor names that must be synthesized for the kernel to apply (e.g. ``("weight",)``).
        forward: ``forward(layer, *args, **kwargs)``; returns the output or ``NotImplemented`` to decline.
        check: Optional ``check(layer) -> str | None``: why the kernel will decline every call of this layer
            (e.g. ``"padding='same'"``), for reports; ``None`` when it serves it.
        units: What the scalar-gradient estimator samples, in words (for reports).
        sharded: How the sampled estimator reads the layer's ``requires[0]`` tensor when its neighbours are
            FSDP2 shards (:mod:`replace_wrap.integrations.fsdp_sampled`): ``"out_in"`` for a linear map stored
            as ``(out, in)`` (``nn.Linear``), ``"in_out"`` for one stored as ``(in, out)`` (HF ``Conv1D``);
            ``None``: under sharding the layer takes the generic path with the exact scalar gradient.
    """

    name: str
    types: tuple[type[nn.Module] | str, ...]
    requires: tuple[str, ...]
    forward: KernelFn
    check: Callable[[nn.Module], str | None] | None = field(default=None, compare=False)
    units: str = "units"
    sharded: str | None = None

    def __post_init__(self) -> None:
        if self.sharded not in SHARDED_LAYOUTS:
            raise RegistryError(f"sharded must be one of {SHARDED_LAYOUTS}, got {self.sharded!r}")

    def matches(self, cls: type, names: tuple[str, ...]) -> bool:
        """Whether this kernel serves a layer of class ``cls`` whose tensors ``names`` are synthesized."""
        if not set(self.requires) <= set(names):
            return False
        for spec in self.types:
            t = _resolve(spec)
            if t is not None and issubclass(cls, t) and all(
                getattr(cls, n, None) is getattr(t, n) for n in _computing_methods(t)
            ):
                return True
        return False


_KERNELS: list[LayerKernel] = []  # registration order is lookup order: first match wins
_LOOKUP: dict[tuple[type, tuple[str, ...]], LayerKernel | None] = {}  # emptied by every registration


def register_layer_kernel(
    *types: type[nn.Module] | str, name: str | None = None, requires: tuple[str, ...] = ("weight",),
    check: Callable[[nn.Module], str | None] | None = None, units: str = "units", sharded: str | None = None,
) -> Callable[[KernelFn], KernelFn]:
    """Register ``fn(layer, *args, **kwargs)`` as the forward of replaced layers of ``types``.

    Experimental. The kernel receives the replaced layer (its synthesized tensors readable as attributes,
    their sources through :func:`mix_source`) and the forward's arguments; it must return what the base
    forward would, or ``NotImplemented`` to fall back to it. It serves layers converted before or after
    its registration. A type may be named by its import path (``"package.module.Class"``): it is resolved
    when a layer runs, only if that module is imported by then, so registering costs no import.
    ``sharded`` names the layout of a linear map's weight for the sampled estimator under FSDP2 (see
    :class:`LayerKernel`); leave it ``None`` for any other layer.

    Raises:
        RegistryError: If no type is given, a type is neither an ``nn.Module`` subclass nor a dotted path,
            the name is taken, a type is already served by another kernel, or ``sharded`` is not a layout.

    Example:
        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(3))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> @register_layer_kernel(Scale, name="doc_scale")
        ... def scale_forward(layer, x):
        ...     return NotImplemented  # always the generic path; a real kernel computes here
        >>> "doc_scale" in list_layer_kernels()
        True
    """
    def valid(t: object) -> bool:
        if isinstance(t, str):
            return "." in t and all(part.isidentifier() for part in t.split("."))
        return isinstance(t, type) and issubclass(t, nn.Module)

    if not types or not all(valid(t) for t in types):
        raise RegistryError(
            f"register_layer_kernel needs nn.Module subclasses or 'package.module.Class' paths, got {types!r}"
        )

    def decorator(fn: KernelFn) -> KernelFn:
        kernel_name = name or fn.__name__
        for k in _KERNELS:
            if k.forward is fn:  # re-running a module (importlib.reload, doctest) is not a duplicate
                return fn
            if k.name == kernel_name:
                raise RegistryError(f"a layer kernel named {kernel_name!r} is already registered; choose another name")
            taken = [t if isinstance(t, str) else t.__qualname__ for t in types if t in k.types]
            if taken:
                raise RegistryError(
                    f"{', '.join(taken)} already has the layer kernel {k.name!r}; register a kernel for a "
                    "subclass instead (the first matching kernel in registration order wins)"
                )
        _KERNELS.append(LayerKernel(kernel_name, tuple(types), tuple(requires), fn, check, units, sharded))
        _LOOKUP.clear()
        return fn

    return decorator


def kernel_for(cls: type, names: tuple[str, ...]) -> LayerKernel | None:
    """The first registered kernel that serves ``cls`` with synthesized ``names``, or ``None``."""
    key = (cls, names)
    try:
        return _LOOKUP[key]
    except KeyError:
        found = next((k for k in _KERNELS if k.matches(cls, names)), None)
        _LOOKUP[key] = found
        return found


def list_layer_kernels() -> list[str]:
    """Names of the registered layer kernels, in lookup order."""
    return [k.name for k in _KERNELS]


class MixSource(NamedTuple):
    """Where a synthesized weight comes from, ready for :mod:`replace_wrap.synthesis.kernels`."""

    a: torch.Tensor
    b: torch.Tensor
    prev: torch.Tensor
    next: torch.Tensor
    sample: float | str | None
    bias: torch.Tensor | None  # the layer's bias when it is not mixed with the weight's scalars (else None)
    bias_mix: tuple[torch.Tensor, torch.Tensor] | None  # (prev, next) bias mixed with the weight's (a, b)
    # Shape-adapted, detached neighbours: (source prev, source next, remake), remake(p, n) -> (prev, next).
    # The layer keeps the sources (the neighbours' own tensors, held anyway) instead of the adapted copies
    # (zero-padded, or zeros for an absent side: weight-sized tensors) and remakes them in its backward.
    remake: tuple[torch.Tensor | None, torch.Tensor | None, Callable[..., Any]] | None = None


def _bias_is_mixed(sources: dict[str, TensorSource], src: TensorSource, bias: str | None) -> bool:
    """Whether the bias is synthesized from the same neighbours with the weight's scalar set."""
    bsrc = None if bias is None else sources.get(bias)
    return (
        bsrc is not None and bsrc.site is src.site and (bsrc.prev, bsrc.next) == (src.prev, src.next)
        and src.site.index_of(bsrc.k) == src.site.index_of(src.k)
    )


def _sides(src: TensorSource, name: str, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbours' current ``name`` tensors, in the replaced tensor's shape (adapted if need be)."""
    return _adapted(src, *_own(src, name, detach))


def _own(src: TensorSource, name: str, detach: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The neighbours' own ``name`` tensors, read once (a parametrized one is computed on every read)."""
    p = None if src.prev is None else getattr(src.prev, name)
    n = None if src.next is None else getattr(src.next, name)
    if detach:
        p = None if p is None else p.detach()
        n = None if n is None else n.detach()
    return p, n


def _adapted(src: TensorSource, p: torch.Tensor | None, n: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not src.adapted:
        return p, n  # type: ignore[return-value]  # both present when nothing is adapted
    # A slice or zero-pad per side (an absent side: zeros). Detached, it is a copy the layer computes with;
    # coupled, autograd takes the neighbours' gradients back through it.
    return adapt_pair(p, n, src.prev_adapter, src.next_adapter)


def mix_source(layer: nn.Module, name: str = "weight", bias: str | None = "bias") -> MixSource | None:
    """How ``layer.<name>`` (and its bias) are synthesized, or ``None`` when the fast path must not be used.

    ``None`` when the site has ``fast_path=False``, when its rule is not a linear mix of the neighbours, when
    ``name`` is not synthesized, or for meta tensors. ``prev`` and ``next`` are the neighbours' tensors in the
    replaced tensor's shape (shape-adapted ones mapped, an absent side as zeros), detached unless the site is
    coupled. A bias synthesized with the same scalars as the weight (``scalars="block"``) comes back as
    ``bias_mix`` so the layer can mix it itself; any other bias (the layer's own, or one with its own scalars)
    as ``bias``.
    """
    state = layer.__dict__
    key = _STATIC + name
    static = state.get(key)
    if static is None:  # what does not change while the layer is replaced, worked out once
        sources = state.get(SOURCES_ATTR, {})
        src = sources.get(name)
        if src is None:
            return None
        # the map remaking adapted neighbours in the backward (see MixSource.remake), made once
        adapt = functools.partial(adapt_pair, prev_adapter=src.prev_adapter, next_adapter=src.next_adapter)
        bias_src = sources[bias] if _bias_is_mixed(sources, src, bias) else None
        static = state[key] = (src, src.site.index_of(src.k), bias_src, adapt if src.adapted else None)
    src, index, bias_src, adapt = static
    site = src.site
    if not site.fast_path or not site.linear_mix:
        return None
    if is_managed(src.prev) or is_managed(src.next):  # FSDP2 (integrations/fsdp_synthesis.py): the neighbours
        return None  # may be sharded; the getter synthesizes from their shards, the generic path differentiates
    if generic_only():  # torch.func transforms, torch.jit.trace: see there
        return None
    detach = site.detach
    own = _own(src, name, detach)
    prev, nxt = _adapted(src, *own)
    remake = (*own, adapt) if detach and adapt is not None else None
    if prev.is_meta or nxt.is_meta:  # meta init: shapes only, the generic path propagates them without the
        return None  # custom backward (and refuses a meta neighbour of a model not wholly on meta: offloading)
    a, b = site.coefficients()
    if a.numel() > 1:  # one set of shape (1,) broadcasts as it is (weights have dimensions): no select op
        a, b = a[index], b[index]
    if bias_src is not None:
        return MixSource(a, b, prev, nxt, site.ab_grad_sample, None, _sides(bias_src, bias, detach), remake)  # type: ignore[arg-type]
    own_bias = None if bias is None else getattr(layer, bias)
    return MixSource(a, b, prev, nxt, site.ab_grad_sample, own_bias, None, remake)


_STATIC = CACHE_PREFIX + "static_"


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)  # private: absent, unknown


def generic_only() -> bool:
    """Whether the replaced layers must take the generic path (plain autograd of the synthesized tensors) now.

    Under a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...): the kernels' autograd Functions define
    none of its rules. Under ``torch.jit.trace`` (and the ONNX export that traces): the tracer cannot record
    a Python autograd Function that saves non-tensor state. Never while compiling: dynamo traces the transforms
    itself and compiles the kernels. Called on every replaced layer's forward: two C calls.
    """
    if torch.compiler.is_compiling():
        return False
    return torch.jit.is_tracing() or (_FUNCTORCH_ACTIVE is not None and bool(_FUNCTORCH_ACTIVE()))


def layer_route(
    layer: nn.Module, names: tuple[str, ...], *, fast_path: bool, linear_mix: bool, adapted: tuple[str, ...],
    coupled: bool, sample: float | str | None,
) -> tuple[str, str]:
    """``(path, estimator)`` a replaced layer takes, in words, e.g. ``("kernel 'linear'", "sampled: ...")``.

    Args:
        layer: The layer (its class and settings decide; it need not be converted yet).
        names: Its synthesized tensor names.
        fast_path: The config's ``fast_path``.
        linear_mix: Whether the rule is a linear mix of the neighbours.
        adapted: Its synthesized tensors whose neighbour tensors are shape-adapted.
        coupled: ``neighbour_grad="coupled"``.
        sample: The config's ``ab_grad_sample``.

    Returns:
        For the generic path ``("generic", "exact (autograd): <why no kernel>")``.
    """
    cls = type(layer).__dict__.get("_rw_base", type(layer))
    kernel = kernel_for(cls, tuple(sorted(names)))
    why = None
    if not fast_path:
        why = "fast_path=False"
    elif kernel is None:
        served = [k for k in _KERNELS if any(isinstance(t, type) and issubclass(cls, t) for t in map(_resolve, k.types))]
        why = (f"{cls.__name__} redefines a method that kernel {served[0].name!r} relies on" if served
               else f"no layer kernel for {cls.__name__}")
    elif not linear_mix:
        why = "the rule is not a linear mix of the neighbours"
    elif kernel.check is not None:
        why = kernel.check(layer)
    if why is not None:
        return "generic", f"exact (autograd): {why}"
    route = f"kernel {kernel.name!r}" + (" (shape-adapted neighbours)" if adapted else "")  # type: ignore[union-attr]
    if coupled:
        return route, "exact: neighbour_grad='coupled' needs the full weight gradient"
    return route, describe_sample(sample).replace("units", kernel.units)  # type: ignore[union-attr]
