"""Layer kernels: fast forwards for the layers of replaced blocks, registered by module type.

A replaced layer reads its synthesized tensors through properties (see :mod:`replace_wrap.surgery.swap`); that
generic path works for every module but pays, in the backward, a full weight-gradient product just to get the
two scalar gradients. A *layer kernel* computes the layer's forward knowing that its weight is
``a * W_prev + b * W_next`` (see :mod:`replace_wrap.synthesis.kernels`).

Lookup: kernels are tried in registration order and the first match wins. The built-ins are registered here,
in this order: ``nn.Linear``, then ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``; kernels registered later by
users come after them, so a user kernel serves layer types the built-ins do not claim. The lookup happens when
a layer runs (cached per registry state), so a kernel registered after a model was converted serves it too.

A kernel serves a class when the class is (a subclass of) one of its types and overrides nothing that the type
runs: a subclass that redefines ``forward``, ``_conv_forward`` or any other method of the type (a LoRA or
quantized linear, a convolution with its own padding) computes something else and keeps the generic path. Only
methods that run at construction (``__init__``, ``reset_parameters``, ``extra_repr``, ...) may differ. A kernel
may also decline a single call by returning ``NotImplemented`` (then the base class's forward runs with the
property path); the built-ins decline when the site has ``fast_path=False``, when the rule is not a linear mix,
under ``torch.no_grad`` (nothing to save, the generic path is as fast) and for inputs or settings they do not
cover (unbatched convolution input, string padding, non-zero padding modes).

Example:
    >>> import torch
    >>> kernel_for(torch.nn.Linear, ("bias", "weight")).name
    'linear'
    >>> kernel_for(torch.nn.LayerNorm, ("bias", "weight")) is None
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..errors import RegistryError
from ..integrations.fsdp_state import is_managed
from .kernels import mixed_conv, mixed_linear, reusable

__all__ = [
    "CACHE_PREFIX",
    "SOURCES_ATTR",
    "LayerKernel",
    "MixSource",
    "TensorSource",
    "kernel_for",
    "list_layer_kernels",
    "mix_source",
    "register_layer_kernel",
    "weight_buffer",
]

KernelFn = Callable[..., Any]

# The contract between a replaced layer and its kernels. The surgery stores, in the layer's __dict__ under
# SOURCES_ATTR, one TensorSource per synthesized tensor name; kernels read them through mix_source().
SOURCES_ATTR = "_rw_sources"


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


@dataclass(frozen=True)
class LayerKernel:
    """A fast forward for layers of the given types.

    Attributes:
        name: Unique name (for errors and listings).
        types: The module types served (subclasses too, unless they redefine a method the type runs).
        requires: Tensor names that must be synthesized for the kernel to apply (e.g. ``("weight",)``).
        forward: ``forward(layer, *args, **kwargs)``; returns the output or ``NotImplemented`` to decline.
    """

    name: str
    types: tuple[type[nn.Module], ...]
    requires: tuple[str, ...]
    forward: KernelFn

    def matches(self, cls: type, names: tuple[str, ...]) -> bool:
        """Whether this kernel serves a layer of class ``cls`` whose tensors ``names`` are synthesized."""
        if not set(self.requires) <= set(names):
            return False
        return any(
            issubclass(cls, t) and all(getattr(cls, n, None) is getattr(t, n) for n in _computing_methods(t))
            for t in self.types
        )


_KERNELS: list[LayerKernel] = []  # registration order is lookup order: first match wins
_LOOKUP: dict[tuple[type, tuple[str, ...]], LayerKernel | None] = {}  # emptied by every registration


def register_layer_kernel(
    *types: type[nn.Module], name: str | None = None, requires: tuple[str, ...] = ("weight",)
) -> Callable[[KernelFn], KernelFn]:
    """Register ``fn(layer, *args, **kwargs)`` as the forward of replaced layers of ``types``.

    Experimental. The kernel receives the replaced layer (its synthesized tensors readable as attributes,
    their sources through :func:`mix_source`) and the forward's arguments; it must return what the base
    forward would, or ``NotImplemented`` to fall back to it. It serves layers converted before or after
    its registration.

    Raises:
        RegistryError: If no type is given, a type is not an ``nn.Module`` subclass, the name is taken, or a
            type is already served by another kernel.

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
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise RegistryError(f"register_layer_kernel needs one or more nn.Module subclasses, got {types!r}")

    def decorator(fn: KernelFn) -> KernelFn:
        kernel_name = name or fn.__name__
        for k in _KERNELS:
            if k.forward is fn:  # re-running a module (importlib.reload, doctest) is not a duplicate
                return fn
            if k.name == kernel_name:
                raise RegistryError(f"a layer kernel named {kernel_name!r} is already registered; choose another name")
            taken = [t.__qualname__ for t in types if t in k.types]
            if taken:
                raise RegistryError(
                    f"{', '.join(taken)} already has the layer kernel {k.name!r}; register a kernel for a "
                    "subclass instead (the first matching kernel in registration order wins)"
                )
        _KERNELS.append(LayerKernel(kernel_name, tuple(types), tuple(requires), fn))
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
    sample: float | None
    bias: torch.Tensor | None  # the layer's bias when it is not mixed with the weight's scalars (else None)
    bias_mix: tuple[torch.Tensor, torch.Tensor] | None  # (prev, next) bias mixed with the weight's (a, b)


def _same_shapes(source: TensorSource) -> bool:
    """Whether neither side of a source needs shape adapting."""
    return source.prev_adapter is None and source.next_adapter is None


def mix_source(layer: nn.Module, name: str = "weight", bias: str | None = "bias") -> MixSource | None:
    """How ``layer.<name>`` (and its bias) are synthesized, or ``None`` when the fast path must not be used.

    ``None`` when the site has ``fast_path=False``, when its rule is not a linear mix of the neighbours, when
    a neighbour's tensor needs shape adapting, or when ``name`` is not synthesized. ``prev`` and ``next`` are detached unless the site is coupled. A bias
    synthesized with the same scalars as the weight (``scalars="block"``) comes back as ``bias_mix`` so the
    layer can mix it itself; any other bias (the layer's own, or one with its own scalars) as ``bias``.
    """
    sources = layer.__dict__.get(SOURCES_ATTR, {})
    src = sources.get(name)
    if src is None:
        return None
    site, k, prev_layer, next_layer = src.site, src.k, src.prev, src.next
    if not _same_shapes(src):  # a neighbour of another shape: the generic (adapted) path
        return None
    if is_managed(prev_layer) or is_managed(next_layer):  # FSDP2 (integrations/fsdp_synthesis.py): the
        return None  # neighbours may be sharded; the getter synthesizes from their shards, the generic path
    if not getattr(site, "fast_path", False) or not getattr(site, "linear_mix", False):
        return None
    index = site.index_of(k)  # the scalar set of the k-th synthesized tensor
    a, b = site.coefficients()
    if a.numel() > 1:  # one set of shape (1,) broadcasts as it is (weights have dimensions): no select op
        a, b = a[index], b[index]
    prev, nxt = getattr(prev_layer, name), getattr(next_layer, name)
    if prev.is_meta:  # meta init: shapes only, the generic path propagates them without the custom backward
        return None
    if site.detach:
        prev, nxt = prev.detach(), nxt.detach()
    own_bias, bias_mix = None, None
    if bias is not None:
        bsrc = sources.get(bias)
        if bsrc is not None and _same_shapes(bsrc) and bsrc.site is site and site.index_of(bsrc.k) == index:
            bp, bn = getattr(prev_layer, bias), getattr(next_layer, bias)
            bias_mix = (bp.detach(), bn.detach()) if site.detach else (bp, bn)
        else:
            own_bias = getattr(layer, bias)
    return MixSource(a, b, prev, nxt, site.ab_grad_sample, own_bias, bias_mix)


CACHE_PREFIX = "_rw_cache_"  # layer attributes with this prefix are caches: not pickled, dropped on uninstall
_WEIGHT_CACHE = CACHE_PREFIX + "weight"


@contextlib.contextmanager
def weight_buffer(layer: nn.Module, like: torch.Tensor) -> Iterator[torch.Tensor | None]:
    """A buffer of the layer to synthesize its weight into, or ``None`` for a fresh tensor.

    Only on the CPU: there a fresh weight-sized tensor per layer and step comes from the operating system
    and is faulted in page by page (measured at a few percent of a ViT step), while accelerator allocators
    cache blocks anyway. The buffer lives between steps, taking the memory a frozen layer's own weight
    takes. It is handed out only when no graph holds it (:func:`replace_wrap.mixed_ops.reusable`), so two
    forwards before a backward each get their own weight, and it leaves the layer while in use, so two
    threads never share it. Not under ``torch.compile`` (a traced graph allocates its own).
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        yield None
        return
    buf = layer.__dict__.pop(_WEIGHT_CACHE, None)  # atomic: one caller at a time holds it
    if buf is None or (buf.shape, buf.dtype, buf.device) != (like.shape, like.dtype, like.device):
        buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    elif not reusable(buf):  # a live graph still needs it: it stays theirs, this call allocates afresh
        buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    try:
        yield buf
    finally:
        layer.__dict__.setdefault(_WEIGHT_CACHE, buf)


@register_layer_kernel(nn.Linear, name="linear")
def _linear_forward(layer: nn.Linear, input: torch.Tensor) -> Any:
    if not torch.is_grad_enabled():
        return NotImplemented
    src = mix_source(layer)
    if src is None:
        return NotImplemented
    with weight_buffer(layer, src.prev) as out:
        return mixed_linear(input, src.a, src.b, src.prev, src.next, src.bias, bias_mix=src.bias_mix,
                            sample=src.sample, out=out)


@register_layer_kernel(nn.Conv1d, nn.Conv2d, nn.Conv3d, name="conv")
def _conv_forward(layer: nn.modules.conv._ConvNd, input: torch.Tensor) -> Any:
    dims = len(layer.kernel_size)
    if (
        not torch.is_grad_enabled()
        or input.dim() != dims + 2  # unbatched input: no batch items to sample
        or isinstance(layer.padding, str)  # "same" may pad asymmetrically; F.conv handles it
        or layer.padding_mode != "zeros"
    ):
        return NotImplemented
    src = mix_source(layer)
    if src is None:
        return NotImplemented
    with weight_buffer(layer, src.prev) as out:
        return mixed_conv(
            input, src.a, src.b, src.prev, src.next, src.bias, bias_mix=src.bias_mix, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups, sample=src.sample, out=out,
        )
