"""Row kernels: replaced layers that map each row of their input on its own (RMS norms), at a frozen layer's cost.

Through the generic path a replaced RMS norm, ``weight * normalize(x)``, pays for its weight's gradient twice
over although only two scalars need it: autograd keeps ``normalize(x)`` (as large as the activation) from the
forward to the backward, and the backward forms the full product ``dy * normalize(x)`` before reducing it. A
frozen norm does neither. On the Llama-style decoder of docs/benchmarks.md those two tensors per replaced norm
cost about 6% of a CPU step (the allocator faults them in afresh every step), more than everything else that
replacing the blocks adds.

A row kernel runs the layer's *own* forward with its synthesized tensors read detached (the same values, so
the output is exactly the layer's, in its own dtypes and rounding), so autograd keeps and computes what it
would for a frozen layer. The scalars' gradient comes from a sample of rows instead: of the input's ``N`` rows
(all dimensions but those of the weight, flattened), ``m = sample_size(N, sample)`` are drawn as the linear
kernels draw theirs (:mod:`replace_wrap.synthesis.estimators`, the same rule and variance bound) and kept; the
backward runs the layer's forward again on those rows alone, with the synthesized tensors attached, and
back-propagates the output gradient at those rows to the scalars, rescaled by ``N / m``. Because row ``i`` of
the output depends only on row ``i`` of the input, that is the unbiased estimate of the exact gradient over
all rows.

That one property is the whole contract, so only layers that have it by definition are served: PyTorch's
``nn.RMSNorm`` and classes that say they are an RMS norm, by their name (``...RMSNorm`` in any case: Hugging
Face's ``LlamaRMSNorm``, ``Qwen3RMSNorm``, ``GemmaRMSNorm`` ..., timm's ``RmsNorm``) or by declaring it to Hugging
Face's kernel hub (``kernel_layer_name == "RMSNorm"``, which transformers relies on to swap a fused RMS-norm
kernel in for the class's forward). Whatever such a class computes per row (its casts, an offset weight), its
own forward computes it here. The first call of each class also checks the property on its input (the first
rows alone give the same output rows); a class that fails it takes the generic path from then on, with a
warning. The kernel declines, and the generic path runs, wherever the estimate would not be the layer's gradient
or cannot be taken: no gradient recorded in an evaluating layer (a training one draws its rows all the same, so
that reentrant checkpointing's two forwards advance the random generator alike), the exact estimator asked for
(``ab_grad_sample=None``), coupled neighbours (they need the full weight gradient), a rule that is not a linear
mix, FSDP2 shards, meta tensors, ``torch.func`` transforms and tracing, and under ``torch.compile`` (its
backward runs the layer's forward again, which a compiled backward cannot).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch import nn

from ..integrations.fsdp_state import is_managed
from .estimators import autocast_dtype, sample_size, sample_units
from .kernels import first_order
from .mixing import SOURCES_ATTR, detached, generic_only

__all__ = ["declares_rms_norm", "row_forward"]

log = logging.getLogger("replace_wrap")

_ROW_WISE: dict[type, bool] = {}  # class -> whether its first call showed it row-wise (see _row_wise)
_PROBE_ROWS = 2


def declares_rms_norm(cls: type) -> bool:
    """Whether ``cls`` says it is an RMS norm: by its name, or to Hugging Face's kernel hub (``kernel_layer_name``)."""
    return cls.__name__.lower().endswith("rmsnorm") or getattr(cls, "kernel_layer_name", None) == "RMSNorm"


def row_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a replaced row-wise layer: its own, plus a sampled estimate of the scalars' gradient.

    Returns ``NotImplemented`` (the generic path) where the estimate does not apply (see the module docstring).
    """
    grad = torch.is_grad_enabled()
    # Without gradients a training layer runs this path too and draws its rows: see mixed_linear's `training`.
    if not (grad or layer.training) or torch.compiler.is_compiling() or generic_only():
        return NotImplemented
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].is_meta:
        return NotImplemented
    x = args[0]
    sources = layer.__dict__[SOURCES_ATTR]
    site = next(iter(sources.values())).site
    sample = site.ab_grad_sample
    if (
        sample is None or not site.fast_path or not site.linear_mix or not site.detach
        or any(is_managed(m) for src in sources.values() for m in (src.prev, src.next))
    ):
        return NotImplemented
    name = "weight" if "weight" in sources else next(iter(sources))
    width = sources[name].shape(name)  # a row's trailing dimensions
    lead = x.dim() - len(width)
    if lead < 1 or tuple(x.shape[lead:]) != width:
        return NotImplemented
    n = x.numel() // max(1, math.prod(width))
    if sample_size(n, sample) >= n:  # every row: the generic path is the exact gradient at no more cost
        return NotImplemented
    with detached(layer):
        y = type(layer)._rw_base.forward(layer, x)  # type: ignore[attr-defined]
    if not _row_wise(layer, x, y, lead, n):
        return NotImplemented  # computed again on the generic path (once per class at most: never wrong)
    params = tuple(p for p in site.parameters() if p.requires_grad)
    if not params:  # frozen scalars: nothing to estimate, the detached forward is the layer's
        return y
    rows, scale = sample_units(n, sample, x.device)
    if not grad:
        return y
    xs = _rows(x.detach(), lead, rows)  # detached: the estimate sends x no gradient
    # The neighbours' tensors are saved only for autograd's check that nothing modified them in place before the
    # backward, which reads them again (as the generic path's saved tensors would be checked).
    sides = tuple(getattr(m, name) for name, src in sources.items() for m in (src.prev, src.next) if m is not None)
    return _RowTap.apply(y, xs, rows, layer, (lead, scale, autocast_dtype(x), len(params)), *params, *sides)


def _rows(t: torch.Tensor, lead: int, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` of ``t`` ``(*lead dims, *width)``, keeping its number of dimensions:
    ``(m, 1, ..., 1, *width)``, so that a forward that unpacks its input's shape runs on them."""
    width = t.shape[lead:]
    picked = t.reshape(-1, *width).index_select(0, rows)
    return picked.view(picked.shape[0], *([1] * (lead - 1)), *width)


def _row_wise(layer: nn.Module, x: torch.Tensor, y: Any, lead: int, n: int) -> bool:
    """Whether the layer's output ``y`` of ``x`` (``n`` rows over ``lead`` dimensions) is row-wise: same leading
    shape, and (checked on the first call of its class) the first rows of ``x`` alone give the first rows of ``y``."""
    if not isinstance(y, torch.Tensor) or tuple(y.shape[:lead]) != tuple(x.shape[:lead]):
        return False
    cls = type(layer)
    known = _ROW_WISE.get(cls)
    if known is None:
        first = torch.arange(min(n, _PROBE_ROWS), device=x.device)
        with torch.no_grad(), detached(layer):
            try:
                alone = cls._rw_base.forward(layer, _rows(x.detach(), lead, first))  # type: ignore[attr-defined]
            except Exception:  # a forward that cannot take rows alone (it needs its input's exact shape)
                alone = None
            want = _rows(y.detach(), lead, first)
            # the same arithmetic per row, but a kernel may vectorize a different number of rows differently:
            # a few roundings of the output's dtype apart at most
            tol = max(1e-3, 4 * torch.finfo(y.dtype).eps) if y.is_floating_point() else 0.0
            known = _ROW_WISE[cls] = (
                isinstance(alone, torch.Tensor) and alone.shape == want.shape
                and torch.allclose(alone.double(), want.double(), rtol=tol, atol=tol)
            )
        if not known:
            log.warning("%s is not row-wise (its first rows alone give other outputs, or none): its replaced layers "
                        "take the generic path, with the exact scalar gradient",
                        cls._rw_base.__name__)  # type: ignore[attr-defined]
    return known


class _RowTap(torch.autograd.Function):
    """Identity on the layer's output; its backward adds the scalars' sampled gradient (see the module docstring).

    The output is the input tensor itself, marked modified (``mark_dirty``) rather than returned as a view: a
    view made inside a custom Function cannot be modified in place later (a model may scale a norm's output in
    place), a dirty tensor can. Its producer keeps no reference to it (a norm's last product saves its operands),
    and autograd would refuse loudly at the backward if one did.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, y: torch.Tensor, xs: torch.Tensor, rows: torch.Tensor, layer: nn.Module,
        settings: tuple[int, float, torch.dtype | None, int], *tensors: torch.Tensor,
    ) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(xs, rows, *tensors)  # the scalars, then the neighbours' tensors (see row_forward)
        ctx.layer = layer
        ctx.lead, ctx.scale, ctx.dtype, ctx.n_params = settings  # leading dims, N/m, autocast dtype, scalars
        return y

    @staticmethod
    @first_order
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, rows, *tensors = ctx.saved_tensors
        params = tensors[: ctx.n_params]
        # shape: dy (*lead, *out) -> the output gradient at the sampled rows, (m, 1, ..., 1, *out) like xs
        d = _rows(dy, ctx.lead, rows)
        amp = torch.autocast(xs.device.type, ctx.dtype) if ctx.dtype is not None else contextlib.nullcontext()
        with torch.enable_grad(), amp:
            ys = type(ctx.layer)._rw_base.forward(ctx.layer, xs)  # synthesized tensors attached to the scalars
        grads = torch.autograd.grad(ys, params, d.to(ys.dtype).view(ys.shape), allow_unused=True)
        none = (None,) * (len(tensors) - ctx.n_params)
        return (dy, None, None, None, None, *(None if g is None else g * ctx.scale for g in grads), *none)
