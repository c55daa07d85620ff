"""Fast forwards for the leaf layers of replaced blocks: a registry of handlers keyed by module type.

A replaced leaf reads its synthesized tensors through properties (see :mod:`replace_wrap.hooks`); that generic
path works for every module but pays, in the backward, a full weight-gradient product just to get the two
scalar gradients. A *leaf handler* replaces the ``forward`` of the swapped class for one layer type with a
computation that knows the weight is ``a * W_prev + b * W_next`` (see :mod:`replace_wrap.mixed_ops`).

Lookup: handlers are tried in registration order and the first match wins. The built-ins are registered
here, in this order: ``nn.Linear``, then ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``; handlers registered
later by users come after them, so a user handler serves layer types the built-ins do not claim. A handler
matches a class when the class is (a subclass of) one of its types *and* still uses that type's own
``forward``: a subclass that overrides ``forward`` (a LoRA or quantized linear, say) computes something else,
so it keeps the generic path. A handler may also decline a single call by returning ``NotImplemented``
(then the base class's forward runs with the property path); the built-ins decline when the site has
``fast_path=False``, when the rule is not a linear mix, under ``torch.no_grad`` (nothing to save, the generic
path is as fast) and for inputs or settings they do not cover (unbatched convolution input, string padding,
non-zero padding modes).

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

HandlerFn = Callable[..., Any]

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


@dataclass(frozen=True)
class LayerKernel:
    """A fast forward for leaves of the given types.

    Attributes:
        name: Unique name (for errors and listings).
        types: The module types served (subclasses too, unless they override ``forward``).
        requires: Tensor names that must be synthesized for the handler to apply (e.g. ``("weight",)``).
        forward: ``forward(leaf, *args, **kwargs)``; returns the output or ``NotImplemented`` to decline.
    """

    name: str
    types: tuple[type[nn.Module], ...]
    requires: tuple[str, ...]
    forward: HandlerFn

    def matches(self, cls: type, names: tuple[str, ...]) -> bool:
        """Whether this handler serves a module of class ``cls`` whose tensors ``names`` are synthesized."""
        if not set(self.requires) <= set(names):
            return False
        return any(issubclass(cls, t) and cls.forward is t.forward for t in self.types)


_KERNELS: list[LayerKernel] = []  # registration order is lookup order: first match wins


def register_layer_kernel(
    *types: type[nn.Module], name: str | None = None, requires: tuple[str, ...] = ("weight",)
) -> Callable[[HandlerFn], HandlerFn]:
    """Register ``fn(leaf, *args, **kwargs)`` as the forward of replaced leaves of ``types``.

    Experimental. The handler receives the swapped leaf (its synthesized tensors readable as attributes,
    their sources through :func:`mix_source`) and the forward's arguments; it must return what the base
    forward would, or ``NotImplemented`` to fall back to it.

    Raises:
        RegistryError: If no type is given, a type is not an ``nn.Module`` subclass, the name is taken, or a
            type is already served by another handler.

    Example:
        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(3))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> @register_layer_kernel(Scale, name="doc_scale")
        ... def scale_forward(leaf, x):
        ...     return NotImplemented  # always the generic path; a real handler computes here
        >>> "doc_scale" in list_layer_kernels()
        True
    """
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise RegistryError(f"register_layer_kernel needs one or more nn.Module subclasses, got {types!r}")

    def decorator(fn: HandlerFn) -> HandlerFn:
        handler_name = name or fn.__name__
        for h in _KERNELS:
            if h.forward is fn:  # re-running a module (importlib.reload, doctest) is not a duplicate
                return fn
            if h.name == handler_name:
                raise RegistryError(f"a leaf handler named {handler_name!r} is already registered; choose another name")
            taken = [t.__qualname__ for t in types if t in h.types]
            if taken:
                raise RegistryError(
                    f"{', '.join(taken)} already has the leaf handler {h.name!r}; register a handler for a "
                    "subclass instead (the first matching handler in registration order wins)"
                )
        _KERNELS.append(LayerKernel(handler_name, tuple(types), tuple(requires), fn))
        return fn

    return decorator


def kernel_for(cls: type, names: tuple[str, ...]) -> LayerKernel | None:
    """The first registered handler that serves ``cls`` with synthesized ``names``, or ``None``."""
    for h in _KERNELS:
        if h.matches(cls, names):
            return h
    return None


def list_layer_kernels() -> list[str]:
    """Names of the registered leaf handlers, in lookup order."""
    return [h.name for h in _KERNELS]


class MixSource(NamedTuple):
    """Where a synthesized weight comes from, ready for :mod:`replace_wrap.mixed_ops`."""

    a: torch.Tensor
    b: torch.Tensor
    prev: torch.Tensor
    next: torch.Tensor
    sample: float | None
    bias: torch.Tensor | None  # the leaf's bias when it is not mixed with the weight's scalars (else None)
    bias_mix: tuple[torch.Tensor, torch.Tensor] | None  # (prev, next) bias mixed with the weight's (a, b)


def _same_shapes(source: TensorSource) -> bool:
    """Whether neither side of a source needs shape adapting."""
    return source.prev_adapter is None and source.next_adapter is None


def mix_source(leaf: nn.Module, name: str = "weight", bias: str | None = "bias") -> MixSource | None:
    """How ``leaf.<name>`` (and its bias) are synthesized, or ``None`` when the fast path must not be used.

    ``None`` when the site has ``fast_path=False``, when its rule is not a linear mix of the neighbours, when
    a neighbour's tensor needs shape adapting, or when ``name`` is not synthesized. ``prev`` and ``next`` are detached unless the site is coupled. A bias
    synthesized with the same scalars as the weight (``scalars="block"``) comes back as ``bias_mix`` so the
    layer can mix it itself; any other bias (the leaf's own, or one with its own scalars) as ``bias``.
    """
    sources = leaf.__dict__.get(SOURCES_ATTR, {})
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
            own_bias = getattr(leaf, bias)
    return MixSource(a, b, prev, nxt, site.ab_grad_sample, own_bias, bias_mix)


CACHE_PREFIX = "_rw_cache_"  # leaf attributes with this prefix are caches: not pickled, dropped on uninstall
_WEIGHT_CACHE = CACHE_PREFIX + "weight"


@contextlib.contextmanager
def weight_buffer(leaf: nn.Module, like: torch.Tensor) -> Iterator[torch.Tensor | None]:
    """A buffer of the leaf to synthesize its weight into, or ``None`` for a fresh tensor.

    Only on the CPU: there a fresh weight-sized tensor per layer and step comes from the operating system
    and is faulted in page by page (measured at a few percent of a ViT step), while accelerator allocators
    cache blocks anyway. The buffer lives between steps, taking the memory a frozen layer's own weight
    takes. It is handed out only when no graph holds it (:func:`replace_wrap.mixed_ops.reusable`), so two
    forwards before a backward each get their own weight, and it leaves the leaf while in use, so two
    threads never share it. Not under ``torch.compile`` (a traced graph allocates its own).
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        yield None
        return
    buf = leaf.__dict__.pop(_WEIGHT_CACHE, None)  # atomic: one caller at a time holds it
    if buf is None or (buf.shape, buf.dtype, buf.device) != (like.shape, like.dtype, like.device):
        buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    elif not reusable(buf):  # a live graph still needs it: it stays theirs, this call allocates afresh
        buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    try:
        yield buf
    finally:
        leaf.__dict__.setdefault(_WEIGHT_CACHE, buf)


@register_layer_kernel(nn.Linear, name="linear")
def _linear_forward(leaf: nn.Linear, input: torch.Tensor) -> Any:
    if not torch.is_grad_enabled():
        return NotImplemented
    src = mix_source(leaf)
    if src is None:
        return NotImplemented
    with weight_buffer(leaf, src.prev) as out:
        return mixed_linear(input, src.a, src.b, src.prev, src.next, src.bias, bias_mix=src.bias_mix,
                            sample=src.sample, out=out)


@register_layer_kernel(nn.Conv1d, nn.Conv2d, nn.Conv3d, name="conv")
def _conv_forward(leaf: nn.modules.conv._ConvNd, input: torch.Tensor) -> Any:
    dims = len(leaf.kernel_size)
    if (
        not torch.is_grad_enabled()
        or input.dim() != dims + 2  # unbatched input: no batch items to sample
        or isinstance(leaf.padding, str)  # "same" may pad asymmetrically; F.conv handles it
        or leaf.padding_mode != "zeros"
    ):
        return NotImplemented
    src = mix_source(leaf)
    if src is None:
        return NotImplemented
    with weight_buffer(leaf, src.prev) as out:
        return mixed_conv(
            input, src.a, src.b, src.prev, src.next, src.bias, bias_mix=src.bias_mix, stride=leaf.stride,
            padding=leaf.padding, dilation=leaf.dilation, groups=leaf.groups, sample=src.sample, out=out,
        )
