"""Linear and convolution layers whose weight is a learned mix of two tensors, with a lean backward.

A replaced layer computes ``y = layer(x, W)`` with ``W = a * W_prev + b * W_next``. Through ordinary autograd
its backward pays a full weight-gradient product ``dW = dy^T x`` (and keeps ``x`` alive for it) only to reduce
``dW`` to two scalars, ``dL/da = <dW, W_prev>`` and ``dL/db = <dW, W_next>``. The functions here compute the
input gradient as a frozen layer would, plus ``dL/da`` and ``dL/db`` as sums over *units* (rows of a linear
layer, output positions of a convolution; see :mod:`replace_wrap.synthesis.estimators`):

- ``sample=None``: exactly, from all units; no weight-sized gradient outlives the backward of the layer;
- ``sample="auto"`` or a fraction: estimated from a uniform sample of the units, rescaled so the estimate is
  unbiased. Only the sampled units' inputs (rows of ``x``; a convolution's patches at the sampled positions)
  and the forward's output there are kept: the output gives one of the two sums for free, so the estimate
  costs one thin product.

When the neighbours receive gradient too (``neighbour_grad="coupled"``), ``dW`` is needed anyway: it is formed
from all units and the scalar gradients are exact whatever ``sample`` says.

The synthesized ``W`` is not kept from the forward: the backward synthesizes it again for the input gradient (one
pass over three weight-sized tensors, a fraction of a percent of the layer's products), so between the forward
and the backward a replaced layer holds no weight at all, where a frozen layer holds its own.

Under autocast the layer computes in the autocast dtype, as ``F.linear`` / ``F.conv2d`` would.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .estimators import (
    ROW_PRODUCT_MAX,
    ab_from_dw,
    ab_from_one_product,
    autocast_dtype,
    bias_sources,
    check_sample,
    mix_bias,
    needs_graph,
    sample_units,
    scalar_grads,
    scalars_on_host,
    transposed,
)
from .maths import mix
from .patches import gather_at, gather_patches, grouped_product, locate

__all__ = ["PATCH_KEEP_MAX", "mixed_conv", "mixed_linear"]

# A convolution's sampled patches are gathered in the forward when they are this small a part of its input;
# larger ones (3x3 and wider kernels) are gathered in the backward from the input, which the layer then keeps
# (in CNNs the layer after a ReLU shares it with the ReLU's backward, so keeping it costs nothing).
PATCH_KEEP_MAX = 1 / 8


_SCRATCH = threading.local()


def _weight(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """The synthesized weight ``a * prev + b * next`` (cast as autocast has it), for use within one call only.

    Neither the forward nor the backward keeps it beyond its own product, so on the CPU it is written into a
    scratch tensor of this thread, one per weight layout, reused by every layer and step: a fresh weight-sized
    tensor per layer and call would come from the operating system and be faulted in page by page (measured at
    2.6% of an HF ViT-B step). The same two passes as :func:`~replace_wrap.synthesis.maths.mix`: bitwise the
    same weight. Accelerator allocators cache blocks anyway, and a compiled graph allocates its own.
    """
    if prev.device.type != "cpu" or torch.compiler.is_compiling():
        w = mix(a, b, prev, next)
    else:
        buffers = _SCRATCH.__dict__.setdefault("buffers", {})
        key = (prev.shape, prev.stride(), prev.dtype)
        out = buffers.get(key)
        if out is None:
            out = buffers[key] = torch.empty_like(prev)
        if a.dtype != prev.dtype:
            a, b = a.to(prev.dtype), b.to(prev.dtype)
        w = torch.mul(prev, a, out=out).addcmul_(next, b)
    return w if dtype is None else w.to(dtype)


def _coupled_grads(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, need_p: bool,
                   need_n: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    dw = dw.to(prev.dtype)
    return (dw * a.to(dw.dtype) if need_p else None), (dw * b.to(dw.dtype) if need_n else None)


class _MixedLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
        bias: torch.Tensor | None, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
        sample: float | str | None, dtype: torch.dtype | None,
    ) -> torch.Tensor:
        need_x, need_a, need_b, need_p, need_n = ctx.needs_input_grad[:5]
        w = _weight(a, b, prev, next)  # used for y only: the backward synthesizes it again
        bias = mix_bias(a, b, bias, bias_prev, bias_next)
        if dtype is not None:  # autocast: compute like F.linear under autocast would
            x, w = x.to(dtype), w.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x, w, bias)
        else:
            y = F.linear(x, w, bias)
        # x: (N, in) rows (mixed_linear flattens the leading dimensions), y: (N, out)
        rows, scale, keep, xw = None, 1.0, None, None
        if need_p or need_n:  # coupled: the neighbours need the full dW, so the scalars get it exactly too
            keep = x
        elif need_a or need_b:
            rows, scale = sample_units(x.shape[0], sample, x.device)
            if rows is None and x.shape[0] > ROW_PRODUCT_MAX:
                keep = x  # exact from dW = dy^T x
            else:  # the units' rows and their x @ W^T (+ mixed bias), which the forward computed
                keep = x if rows is None else x.index_select(0, rows)
                xw = y.clone() if rows is None else y.index_select(0, rows)
                if bias is not None and bias_prev is None:  # an own bias is no part of the mix
                    xw.sub_(bias)
        # Everything through save_for_backward, so checkpointing (recompute=True) can drop and replay it. The
        # synthesized weight is not kept: the backward makes it again (one pass over the weights), so between
        # forward and backward a replaced layer holds no weight at all, where a frozen one holds its own.
        ctx.save_for_backward(keep, rows, xw, a, b, prev, next, bias_prev, bias_next)
        ctx.scale, ctx.host, ctx.dtype = scale, scalars_on_host(a), dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        keep, rows, xw, a, b, prev, next, bias_prev, bias_next = ctx.saved_tensors
        need_x, need_a, need_b, need_p, need_n, need_bias, need_bp, need_bn = ctx.needs_input_grad[:8]
        gx = ga = gb = gp = gn = db = None
        if need_x:
            w = _weight(a, b, prev, next, ctx.dtype)
            gx = dy.to(w.dtype) @ w  # shape: (N, out) @ (out, in) -> (N, in)
            del w
        if need_bias or need_bp or need_bn or (bias_prev is not None and (need_a or need_b) and xw is None):
            db = dy.sum(0)  # the bias's gradient, over all rows
        if xw is not None:  # the mixed bias's share of dL/da, dL/db is taken over the same units
            d = dy if rows is None else dy.index_select(0, rows)
            ga, gb = ab_from_one_product(d, keep, xw, a, b, prev, next, bias_prev, bias_next, ctx.host)
        elif keep is not None:
            d = dy.to(keep.dtype)
            # dW in the memory layout of the neighbours' weights (no copy for the dot products)
            dw = (keep.t() @ d).t() if transposed(prev) else d.t() @ keep  # shape: (out, N) @ (N, in)
            ga, gb = ab_from_dw(dw, prev, next)
            if need_p or need_n:
                gp, gn = _coupled_grads(dw, a, b, prev, need_p, need_n)
        ga, gb = scalar_grads((need_a, need_b), ctx.scale, ga, gb, None if xw is not None else db, bias_prev,
                              bias_next, a, b)
        gbp = (db.to(bias_prev.dtype) * a.to(bias_prev.dtype)) if need_bp else None
        gbn = (db.to(bias_next.dtype) * b.to(bias_next.dtype)) if need_bn else None
        return gx, ga, gb, gp, gn, db if need_bias else None, gbp, gbn, None, None


def mixed_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    prev: torch.Tensor,
    next: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bias_mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    sample: float | str | None = None,
) -> torch.Tensor:
    """``F.linear(x, a * prev + b * next, bias)`` with the lean backward described in the module docstring.

    Args:
        x: Input of shape ``(..., in)``.
        a: Coefficient of ``prev``: a 0-d tensor or of shape ``(1,)`` (fp32 whatever the weights' dtype).
        b: Coefficient of ``next``, of the shape of ``a``.
        prev: Weight of shape ``(out, in)``; detach it to send it no gradient. A transposed view of an
            ``(in, out)`` tensor (Hugging Face ``Conv1D``) is computed with in its own layout, without copies.
        next: Weight of the same shape and layout.
        bias: Optional bias of shape ``(out,)`` (any autograd history is kept).
        bias_mix: Instead of ``bias``: ``(bias_prev, bias_next)``, mixed with the same ``a, b`` inside the
            layer (saves the small autograd graph of mixing it outside).
        sample: ``None`` for exact ``dL/da, dL/db``; ``"auto"`` or a fraction in ``(0, 1]`` of the rows of
            ``x`` (all leading dimensions flattened) to estimate them from (a ``bias_mix`` share included),
            by the rule of :mod:`replace_wrap.synthesis.estimators`.

    Returns:
        The output, as ``F.linear`` would give it.

    Example:
        >>> x = torch.randn(4, 3)
        >>> a, b = torch.tensor(0.5, requires_grad=True), torch.tensor(0.5, requires_grad=True)
        >>> wp, wn = torch.randn(2, 3), torch.randn(2, 3)
        >>> y = mixed_linear(x, a, b, wp, wn)
        >>> torch.allclose(y, x @ (0.5 * wp + 0.5 * wn).T)
        True
        >>> y.sum().backward(); a.grad.shape
        torch.Size([])
    """
    sample = check_sample(sample)
    bp, bn = bias_sources(bias, bias_mix)
    if not needs_graph(x, a, b, prev, next, bias, bp, bn):  # inference or no-grad: nothing to save
        return F.linear(x, mix(a, b, prev, next), mix_bias(a, b, bias, bp, bn))
    # The Function sees rows only: F.linear with a bias returns a view for inputs of more than two dimensions,
    # and a view made inside a custom Function cannot be modified in place afterwards (an inplace ReLU after a
    # linear layer, Swin-v2's position-bias MLP). Reshaped out here, it is an ordinary view autograd tracks.
    # shape: x (..., in) -> (N, in) -> y (N, out) -> (..., out)
    y = _MixedLinear.apply(x.reshape(-1, x.shape[-1]), a, b, prev, next, bias, bp, bn, sample, autocast_dtype(x))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class _MixedConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
        bias: torch.Tensor | None, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
        sample: float | str | None, dtype: torch.dtype | None,
        geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
    ) -> torch.Tensor:
        need_x, need_a, need_b, need_p, need_n = ctx.needs_input_grad[:5]
        stride, padding, dilation, groups = geometry
        w = _weight(a, b, prev, next)  # used for y only: the backward synthesizes it again
        bias = mix_bias(a, b, bias, bias_prev, bias_next)
        if dtype is not None:
            x, w = x.to(dtype), w.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        y = torch.convolution(x, w, bias, stride, padding, dilation, False, [0] * len(stride), groups)
        units, scale, keep, xw = None, 1.0, None, None
        ctx.patches = False
        if need_p or need_n:
            keep = x
        elif need_a or need_b:  # units: output positions of every batch item, shape (N, out, *spatial)
            units, scale = sample_units(y.shape[0] * math.prod(y.shape[2:]), sample, x.device)
            keep = x
            if units is not None:
                where = locate(units, tuple(y.shape[2:]))
                xw = gather_at(y, where)  # shape: (m, out): the forward's output at the sampled positions
                if bias is not None and bias_prev is None:
                    xw.sub_(bias)
                if units.numel() * math.prod(prev.shape[1:]) * groups <= PATCH_KEEP_MAX * x.numel():
                    keep = gather_patches(x, where, tuple(prev.shape[2:]), stride, padding, dilation)
                    ctx.patches = True
        ctx.save_for_backward(keep, units, xw, a, b, prev, next, bias_prev, bias_next)  # no weight: see _MixedLinear
        ctx.scale, ctx.geometry, ctx.x_shape, ctx.host, ctx.dtype = scale, geometry, x.shape, scalars_on_host(a), dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        keep, units, xw, a, b, prev, next, bias_prev, bias_next = ctx.saved_tensors
        need_x, need_a, need_b, need_p, need_n, need_bias, need_bp, need_bn = ctx.needs_input_grad[:8]
        stride, padding, dilation, groups = ctx.geometry
        args = (None, list(stride), list(padding), list(dilation), False, [0] * len(stride), groups)
        gx = ga = gb = gp = gn = db = None
        if need_x:
            w = _weight(a, b, prev, next, ctx.dtype)
            gx = _input_grad(dy.to(w.dtype), w, ctx.x_shape, stride, padding, dilation, groups)
            del w
        if need_bias or need_bp or need_bn or (bias_prev is not None and (need_a or need_b) and xw is None):
            db = dy.sum([d for d in range(dy.dim()) if d != 1])
        if xw is not None:
            where = locate(units, tuple(dy.shape[2:]))
            d = gather_at(dy, where)  # shape: (m, out)
            xs = keep if ctx.patches else gather_patches(keep, where, tuple(prev.shape[2:]), stride, padding, dilation)
            ga, gb = ab_from_one_product(d, xs, xw, a, b, prev, next, bias_prev, bias_next, ctx.host,
                                         grouped_product(groups))
        elif keep is not None:
            d = dy.to(keep.dtype)
            # the weight argument only lends its shape to the weight gradient
            dw = torch.ops.aten.convolution_backward(d, keep, prev.to(keep.dtype), *args, (False, True, False))[1]
            ga, gb = ab_from_dw(dw, prev, next)
            if need_p or need_n:
                gp, gn = _coupled_grads(dw, a, b, prev, need_p, need_n)
        ga, gb = scalar_grads((need_a, need_b), ctx.scale, ga, gb, None if xw is not None else db, bias_prev,
                              bias_next, a, b)
        gbp = (db.to(bias_prev.dtype) * a.to(bias_prev.dtype)) if need_bp else None
        gbn = (db.to(bias_next.dtype) * b.to(bias_next.dtype)) if need_bn else None
        return gx, ga, gb, gp, gn, db if need_bias else None, gbp, gbn, None, None, None


def mixed_conv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    prev: torch.Tensor,
    next: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int = 1,
    bias_mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    sample: float | str | None = None,
) -> torch.Tensor:
    """A batched N-d convolution with weight ``a * prev + b * next`` and the lean backward.

    Args:
        x: Batched input ``(batch, channels, *spatial)``.
        a: Coefficient of ``prev``: a 0-d tensor or of shape ``(1,)``.
        b: Coefficient of ``next``, of the shape of ``a``.
        prev: Weight ``(out, in / groups, *kernel)``; detach it to send it no gradient.
        next: Weight of the same shape.
        bias: Optional bias ``(out,)``.
        stride: Per spatial dimension.
        padding: Zero padding per spatial dimension (integers; ``"same"`` is resolved by the caller).
        dilation: Per spatial dimension.
        groups: Convolution groups.
        bias_mix: Instead of ``bias``: ``(bias_prev, bias_next)``, mixed with the same ``a, b``.
        sample: ``None`` for exact ``dL/da, dL/db``; ``"auto"`` or a fraction in ``(0, 1]`` of the output
            positions (batch items times spatial positions) to estimate them from.

    Example:
        >>> x = torch.randn(2, 3, 5, 5)
        >>> a = b = torch.tensor(0.5, requires_grad=True)
        >>> wp, wn = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
        >>> y = mixed_conv(x, a, b, wp, wn, stride=(1, 1), padding=(1, 1), dilation=(1, 1))
        >>> torch.allclose(y, F.conv2d(x, 0.5 * wp + 0.5 * wn, padding=1), atol=1e-5)
        True
    """
    sample = check_sample(sample)
    bp, bn = bias_sources(bias, bias_mix)
    geometry = (tuple(stride), tuple(padding), tuple(dilation), int(groups))
    if not needs_graph(x, a, b, prev, next, bias, bp, bn):
        return _plain_conv(x, mix(a, b, prev, next), mix_bias(a, b, bias, bp, bn), geometry)
    return _MixedConv.apply(x, a, b, prev, next, bias, bp, bn, sample, autocast_dtype(x), geometry)


def _input_grad(dy: torch.Tensor, w: torch.Tensor, x_shape: torch.Size, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """The convolution's input gradient, as the transposed convolution of ``dy``.

    ``convolution_backward`` with an expanded stand-in for the input (what ``torch.nn.grad.conv2d_input`` does)
    measured 20-40% slower on the CPU (oneDNN) and faults in input-sized temporaries; the transposed
    convolution needs no input at all. ``output_padding`` restores the rows a strided forward dropped.
    """
    dims = len(stride)
    kernel = w.shape[2:]
    extra = [
        x_shape[2 + d] - ((dy.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1) + 1)
        for d in range(dims)
    ]
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return conv_t(dy, w, None, stride, padding, extra, groups, dilation)


def _plain_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, geometry: Any) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(stride) - 1]  # the F functions honour autocast
    return conv(x, w, bias, stride, padding, dilation, groups)
