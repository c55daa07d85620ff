"""How a replaced layer's synthesized tensors are made: the contract between the surgery and the layer kernels.

The surgery (:mod:`replace_wrap.surgery.swap`) stores, in a replaced layer's ``__dict__`` under
:data:`SOURCES_ATTR`, one :class:`TensorSource` per synthesized tensor. The layer kernels read them through
:func:`mix_source`, which says how the weight is mixed (scalars, neighbours, adapted shapes) or that the fast
path must not be used now; :func:`generic_only` says when no kernel may run (``torch.func``, ``torch.jit.trace``).
:func:`detached` marks a layer, in this thread, while a kernel runs the layer's own forward on detached synthesized
tensors (:mod:`replace_wrap.synthesis.row_kernels`); :func:`reads_detached` is what the layer's properties ask.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..errors import CompatibilityError
from ..integrations.fsdp_state import is_managed
from .adapt import adapt_pair

__all__ = [
    "CACHE_PREFIX", "SOURCES_ATTR", "MixSource", "TensorSource", "detached", "generic_only", "mix_source",
    "read_neighbour", "reads_detached", "refuse_hook_computed",
]

# The contract between a replaced layer and its kernels. The surgery stores, in the layer's __dict__ under
# SOURCES_ATTR, one TensorSource per synthesized tensor name; kernels read them through mix_source().
SOURCES_ATTR = "_rw_sources"
CACHE_PREFIX = "_rw_cache_"  # layer attributes with this prefix are caches: not pickled, dropped on uninstall

# Per thread: ids of the layers whose synthesized tensors are read detached now (see detached). Per thread, not
# on the layer: another thread running the same layer meanwhile must get its tensors with their history.
_DETACHED = threading.local()


@contextlib.contextmanager
def detached(layer: nn.Module) -> Iterator[None]:
    """While it lasts, this thread reads ``layer``'s synthesized tensors without autograd history: a kernel that
    runs the layer's own forward and routes the scalars' gradient itself."""
    ids = _DETACHED.__dict__.setdefault("ids", set())
    key = id(layer)
    nested = key in ids
    ids.add(key)
    try:
        yield
    finally:
        if not nested:
            ids.discard(key)


def reads_detached(layer: nn.Module) -> bool:
    """Whether this thread reads ``layer``'s synthesized tensors detached now (:func:`detached`)."""
    ids = _DETACHED.__dict__.get("ids")
    return bool(ids) and id(layer) in ids


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
    def inputs(self) -> tuple[nn.Module, ...]:
        """The modules whose tensors the synthesized tensor is computed from: the site (the scalars, a rule's
        state) and the neighbour layers present (their parameters, or a parametrization's)."""
        return (self.site, *(m for m in (self.prev, self.next) if m is not None))

    @property
    def adapted(self) -> bool:
        """Whether either side is mapped to the replaced tensor's shape (else both are used as they are)."""
        return self.prev_adapter is not None or self.next_adapter is not None

    def shape(self, name: str) -> tuple[int, ...]:
        """The synthesized ``name``'s shape, from the adapter or a neighbour's tensor: nothing synthesized."""
        if self.adapted:
            return tuple((self.prev_adapter or self.next_adapter).target)
        return tuple(getattr(self.prev if self.prev is not None else self.next, name).shape)


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
    prev, nxt = src.prev, src.next
    refuse_hook_computed(src, name)
    p = None if prev is None else read_neighbour(prev, name)
    n = None if nxt is None else read_neighbour(nxt, name)
    if detach:
        p = None if p is None else p.detach()
        n = None if n is None else n.detach()
    return p, n


def read_neighbour(layer: nn.Module, name: str) -> torch.Tensor:
    """``layer.<name>`` as a replaced block reads it from a neighbour layer: a parametrized tensor is computed
    with its parametrizations in eval mode.

    A parametrization may change its own state when computed in training (spectral_norm's power iteration
    updates its ``_u``/``_v`` buffers in place) or draw at random (a weight dropout). Its layer computes it once
    per forward; a replaced block reads it besides, outside that forward, and so do ``state_dict()``, ``save``
    and ``merge``. Read in training mode, each of those reads moved the neighbour's state (a ``state_dict()``
    changed the model it saved; ``merge`` gave a model other than the converted one; the saved synthesized
    values and the saved buffers came from different iterations) or baked one random draw into the merged
    tensor. Read in eval mode, the neighbour's state moves only in its own forward, as in a plain model. One
    dict lookup for a layer without parametrizations.
    """
    holder = layer._modules.get("parametrizations")
    plist = None if holder is None else holder._modules.get(name)
    if plist is None:
        return getattr(layer, name)
    training = [m for m in plist.modules() if m.training]
    if not training:
        return getattr(layer, name)
    for m in training:
        m.training = False
    try:
        return getattr(layer, name)
    finally:
        for m in training:
            m.training = True


def refuse_hook_computed(src: TensorSource, name: str) -> None:
    """Refuse to synthesize from a neighbour whose ``name`` is a plain attribute rather than its parameter
    (nothing to do where neither is).

    ``torch.nn.utils.prune`` and the legacy hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` remove a
    layer's parameter and set the tensor as a plain attribute that a forward pre-hook recomputes before *that
    layer's own* forward. A replaced block reads its neighbours' tensors outside their forward (the next block
    runs after it; merge and state_dict run no forward at all), so it would read the value of the neighbour's
    last forward: stale after every optimizer step or load, and two identical calls would differ. Both
    synthesis paths (the layer kernels and the synthesized attribute) call this on every read; it raises when
    ``name`` is found in a neighbour's instance ``__dict__`` (where ``nn.Module`` puts a tensor that is no
    parameter or buffer).
    """
    prev, nxt = src.prev, src.next
    if (prev is None or name not in prev.__dict__) and (nxt is None or name not in nxt.__dict__):
        return  # two dict lookups on every synthesis: both sides are parameters (or parametrized)
    site = src.site
    rel = site.tensor_names[src.k]
    side = site.next_path if src.next is not None and name in src.next.__dict__ else site.prev_path
    raise CompatibilityError(
        f"a replaced layer of the block between {site.prev_path!r} and {site.next_path!r} synthesizes {rel!r} "
        f"from {side}.{rel}, which is no longer a parameter of that layer but a plain attribute that a forward "
        "pre-hook recomputes before that layer's own forward (torch.nn.utils.prune, or the legacy "
        "torch.nn.utils.weight_norm / spectral_norm, applied after convert). A replaced block reads its "
        "neighbours' tensors outside their forward, so it would compute with a stale value (the one of the "
        "neighbour's last forward). Undo it (torch.nn.utils.prune.remove, torch.nn.utils.remove_weight_norm, "
        "torch.nn.utils.remove_spectral_norm) and use the parametrize-based versions "
        "(torch.nn.utils.parametrizations.weight_norm / spectral_norm, or "
        "torch.nn.utils.parametrize.register_parametrization for a pruning mask), computed on every read; or "
        "merge first (replace_wrap.merge(model)) and prune or normalize the plain model."
    )


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


def _onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is capturing now: its flag, read where it lives (``torch.onnx``'s own
    ``is_in_onnx_export`` imports two modules on every call); False where this private module is absent."""
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return flags is not None and bool(getattr(flags, "_is_onnx_exporting", False))


def generic_only() -> bool:
    """Whether the replaced layers must take the generic path (plain autograd of the synthesized tensors) now.

    Under a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...): the kernels' autograd Functions define
    none of its rules. Under ``torch.jit.trace`` (and the ONNX export that traces): the tracer cannot record
    a Python autograd Function that saves non-tensor state. Never while compiling: dynamo traces the transforms
    itself and compiles the kernels, except for ``torch.onnx.export`` (``dynamo=True``), which captures with a
    non-strict ``torch.export``: ONNX has no function for the kernels' custom operators. Called on every replaced
    layer's forward: two C calls.
    """
    if torch.compiler.is_compiling():
        # dynamo (torch.compile, strict export) stops at its first call; only a non-strict capture reads the flag
        return not torch.compiler.is_dynamo_compiling() and _onnx_exporting()
    return torch.jit.is_tracing() or (_FUNCTORCH_ACTIVE is not None and bool(_FUNCTORCH_ACTIVE()))
