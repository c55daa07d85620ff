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

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import RegistryError
from .estimators import describe_sample
from .mixing import CACHE_PREFIX, SOURCES_ATTR, MixSource, TensorSource, generic_only, mix_source

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
        declared: Optional ``declared(cls) -> bool``: classes that declare themselves the kind of layer the
            kernel serves (e.g. Hugging Face's ``kernel_layer_name = "RMSNorm"``), served whatever their type,
            for kernels that run the layer's own forward.
        exact: Whether the kernel also computes the exact scalar gradient. ``False``: with
            ``ab_grad_sample=None`` or ``neighbour_grad="coupled"`` the layer takes the generic path (which is
            exact), and the reports say so.
    """

    name: str
    types: tuple[type[nn.Module] | str, ...]
    requires: tuple[str, ...]
    forward: KernelFn
    check: Callable[[nn.Module], str | None] | None = field(default=None, compare=False)
    units: str = "units"
    sharded: str | None = None
    declared: Callable[[type], bool] | None = field(default=None, compare=False)
    exact: bool = True

    def __post_init__(self) -> None:
        if self.sharded not in SHARDED_LAYOUTS:
            raise RegistryError(f"sharded must be one of {SHARDED_LAYOUTS}, got {self.sharded!r}")

    def matches(self, cls: type, names: tuple[str, ...], by_declaration: bool = False) -> bool:
        """Whether this kernel serves a layer of class ``cls`` whose tensors ``names`` are synthesized: by one of
        its types, or (``by_declaration=True``) by the class's declaration alone."""
        if not set(self.requires) <= set(names):
            return False
        if by_declaration:
            return self.declared is not None and self.declared(cls)
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
    declared: Callable[[type], bool] | None = None, exact: bool = True,
) -> Callable[[KernelFn], KernelFn]:
    """Register ``fn(layer, *args, **kwargs)`` as the forward of replaced layers of ``types``.

    Experimental. The kernel receives the replaced layer (its synthesized tensors readable as attributes,
    their sources through :func:`mix_source`) and the forward's arguments; it must return what the base
    forward would, or ``NotImplemented`` to fall back to it. It serves layers converted before or after
    its registration. A type may be named by its import path (``"package.module.Class"``): it is resolved
    when a layer runs, only if that module is imported by then, so registering costs no import.
    ``sharded`` names the layout of a linear map's weight for the sampled estimator under FSDP2, ``declared``
    serves classes by a declaration rather than a type, and ``exact=False`` marks a kernel that only samples
    (see :class:`LayerKernel`).

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
        _KERNELS.append(LayerKernel(kernel_name, tuple(types), tuple(requires), fn, check, units, sharded, declared,
                                    exact))
        _LOOKUP.clear()
        return fn

    return decorator


def kernel_for(cls: type, names: tuple[str, ...]) -> LayerKernel | None:
    """The first registered kernel that serves ``cls`` with synthesized ``names``, or ``None``.

    Types first, declarations after: a kernel registered for a class (a user's, for their own RMS norm) wins over
    a built-in that would serve the class only by what it declares (its name).
    """
    key = (cls, names)
    try:
        return _LOOKUP[key]
    except KeyError:
        found = next((k for k in _KERNELS if k.matches(cls, names)), None) or next(
            (k for k in _KERNELS if k.matches(cls, names, by_declaration=True)), None
        )
        _LOOKUP[key] = found
        return found


def list_layer_kernels() -> list[str]:
    """Names of the registered layer kernels, in lookup order."""
    return [k.name for k in _KERNELS]


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
    elif not kernel.exact and (coupled or sample is None):
        why = (f"kernel {kernel.name!r} only samples and "
               + ("neighbour_grad='coupled' needs the full weight gradient" if coupled else "ab_grad_sample=None"))
    elif kernel.check is not None:
        why = kernel.check(layer)
    if why is not None:
        return "generic", f"exact (autograd): {why}"
    route = f"kernel {kernel.name!r}" + (" (shape-adapted neighbours)" if adapted else "")  # type: ignore[union-attr]
    if coupled:
        return route, "exact: neighbour_grad='coupled' needs the full weight gradient"
    return route, describe_sample(sample).replace("units", kernel.units)  # type: ignore[union-attr]
