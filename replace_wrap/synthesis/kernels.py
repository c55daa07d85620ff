"""Linear and convolution layers whose weight is a learned mix of two tensors, with a lean backward.

A replaced layer computes ``y = layer(x, W)`` with ``W = a * W_prev + b * W_next``. Through ordinary autograd
its backward pays a full weight-gradient product ``dW = dy^T x`` (and keeps ``x`` alive for it) only to reduce
``dW`` to two scalars, ``dL/da = <dW, W_prev>`` and ``dL/db = <dW, W_next>``. The functions here compute the
input gradient as a frozen layer would, plus ``dL/da`` and ``dL/db``:

- exactly (``sample=None``), from all rows; no weight-sized gradient outlives the backward of the layer;
- or estimated (``sample=f``) from a uniformly drawn fraction ``f`` of the rows (tokens for a linear layer,
  batch items for a convolution), rescaled by ``N / m`` so the estimate is unbiased. Only the sampled rows
  of ``x`` (and, for a linear layer, of ``x @ W^T``, which gives one of the two sums for free) are kept.

With few rows the scalar gradients are taken without forming ``dW`` at all:
``dL/da = sum(dy_s * (x_s @ W_prev^T))`` costs two thin products; with many rows one ``dW = dy^T x`` plus two
dot products is cheaper. When the neighbours receive gradient too (``neighbour_grad="coupled"``), ``dW`` is
needed anyway: it is formed from all rows and the scalar gradients are exact whatever ``sample`` says.

The synthesized ``W`` is kept from the forward for the input gradient: it takes the place, in memory, of the
replaced block's own tensor that no longer exists, and spares a second synthesis in the backward.

Under autocast the layer computes in the autocast dtype, as ``F.linear`` / ``F.conv2d`` would.
"""

from __future__ import annotations

import math
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
    mix_weight,
    needs_graph,
    reusable,
    sample_rows,
    scalar_grads,
)
from .maths import mix

__all__ = ["check_sample", "mixed_conv", "mixed_linear", "reusable", "sample_rows"]


class _MixedLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        prev: torch.Tensor,
        next: torch.Tensor,
        bias: torch.Tensor | None,
        bias_prev: torch.Tensor | None,
        bias_next: torch.Tensor | None,
        sample: float | None,
        dtype: torch.dtype | None,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        need_x, need_a, need_b, need_p, need_n = ctx.needs_input_grad[:5]
        w = mix_weight(a, b, prev, next, out)
        bias = mix_bias(a, b, bias, bias_prev, bias_next)
        if dtype is None:
            y = F.linear(x, w, bias)
        else:  # autocast: compute like F.linear under autocast would
            x, w = x.to(dtype), w.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x, w, bias)
        x2 = x  # shape: (N, in): mixed_linear passes rows
        rows, scale, keep, xw = None, 1.0, None, None
        if need_p or need_n:  # coupled: the neighbours need the full dW, so the scalars get it exactly too
            keep = x2
        elif need_a or need_b:
            rows, scale = sample_rows(x2.shape[0], sample, x.device)
            keep = x2 if rows is None else x2.index_select(0, rows)
            if rows is not None:  # the sampled rows of x @ W^T (+ mixed bias): the forward computed them
                xw = y.reshape(-1, y.shape[-1]).index_select(0, rows)
                if bias is not None and bias_prev is None:  # an own bias is no part of the mix
                    xw.sub_(bias)
        # Everything through save_for_backward, so checkpointing (recompute=True) can drop and replay it.
        ctx.save_for_backward(w if need_x else None, keep, rows, xw, a, b, prev, next, bias_prev, bias_next)
        ctx.scale = scale
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, keep, rows, xw, a, b, prev, next, bias_prev, bias_next = ctx.saved_tensors
        need_x, need_a, need_b, need_p, need_n, need_bias, need_bp, need_bn = ctx.needs_input_grad[:8]
        gx = ga = gb = gp = gn = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])  # shape: (N, out)
        if need_x:
            gx = dy.to(w.dtype) @ w  # shape: (..., out) @ (out, in) -> (..., in)
        sampled = xw is not None  # then the mixed bias's share of dL/da, dL/db is sampled with the rest
        if need_bias or need_bp or need_bn or (bias_prev is not None and (need_a or need_b) and not sampled):
            db = dy2.sum(0)  # the bias's gradient, over all rows
        if keep is not None:
            d = dy2 if rows is None else dy2.index_select(0, rows)
            if sampled:
                ga, gb = ab_from_one_product(d, keep, xw, a, b, prev, next, bias_prev, bias_next)
            elif need_p or need_n or d.shape[0] > ROW_PRODUCT_MAX:
                dw = d.to(keep.dtype).t() @ keep  # shape: (out, N) @ (N, in) -> (out, in)
                ga, gb = ab_from_dw(dw, prev, next)
                if need_p or need_n:
                    dw = dw.to(prev.dtype)
                    gp = dw * a.to(dw.dtype) if need_p else None
                    gn = dw * b.to(dw.dtype) if need_n else None
            else:  # few rows: sum(d * (x_s @ W^T)), two thin products, no (out, in) tensor
                xs, d = keep.to(prev.dtype), d.to(prev.dtype)
                ga = torch.dot((xs @ prev.t()).reshape(-1), d.reshape(-1))  # shape: (m, out) . (m, out)
                gb = torch.dot((xs @ next.t()).reshape(-1), d.reshape(-1))
        ga, gb = scalar_grads(ctx, ga, gb, None if sampled else db, bias_prev, bias_next, a, b)
        gbp = (db.to(bias_prev.dtype) * a.to(bias_prev.dtype)) if need_bp else None
        gbn = (db.to(bias_next.dtype) * b.to(bias_next.dtype)) if need_bn else None
        return gx, ga, gb, gp, gn, db if need_bias else None, gbp, gbn, None, None, None


def mixed_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    prev: torch.Tensor,
    next: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bias_mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    sample: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, a * prev + b * next, bias)`` with the lean backward described in the module docstring.

    Args:
        x: Input of shape ``(..., in)``.
        a: Coefficient of ``prev``: a 0-d tensor or of shape ``(1,)`` (fp32 whatever the weights' dtype).
        b: Coefficient of ``next``, of the shape of ``a``.
        prev: Weight of shape ``(out, in)``; detach it to send it no gradient.
        next: Weight of the same shape.
        bias: Optional bias of shape ``(out,)`` (any autograd history is kept).
        bias_mix: Instead of ``bias``: ``(bias_prev, bias_next)``, mixed with the same ``a, b`` inside the
            layer (saves the small autograd graph of mixing it outside).
        sample: ``None`` for exact ``dL/da, dL/db``; a fraction in ``(0, 1]`` of the rows of ``x`` (all
            leading dimensions flattened) to estimate them from (a ``bias_mix`` share included).
        out: A tensor like ``prev`` to synthesize the weight into instead of a fresh one. It is kept for the
            backward: the caller must not hand it out again while a graph that saved it is alive (see
            :func:`reusable`).

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
    if not needs_graph(x, a, b, prev, next, bp, bn):  # inference or no-grad: nothing to save
        return F.linear(x, mix(a, b, prev, next), mix_bias(a, b, bias, bp, bn))
    # The Function sees rows only: F.linear with a bias returns a view for inputs of more than two dimensions,
    # and a view made inside a custom Function cannot be modified in place afterwards (an inplace ReLU after a
    # linear layer, Swin-v2's position-bias MLP). Reshaped out here, it is an ordinary view autograd tracks.
    # shape: x (..., in) -> (N, in) -> y (N, out) -> (..., out)
    y = _MixedLinear.apply(x.reshape(-1, x.shape[-1]), a, b, prev, next, bias, bp, bn, sample, autocast_dtype(x), out)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class _MixedConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        prev: torch.Tensor,
        next: torch.Tensor,
        bias: torch.Tensor | None,
        bias_prev: torch.Tensor | None,
        bias_next: torch.Tensor | None,
        sample: float | None,
        dtype: torch.dtype | None,
        geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        need_x, need_a, need_b, need_p, need_n = ctx.needs_input_grad[:5]
        stride, padding, dilation, groups = geometry
        w = mix_weight(a, b, prev, next, out)
        bias = mix_bias(a, b, bias, bias_prev, bias_next)
        if dtype is not None:
            x, w = x.to(dtype), w.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        y = torch.convolution(x, w, bias, stride, padding, dilation, False, [0] * len(stride), groups)
        rows, scale, keep = None, 1.0, None
        if need_p or need_n:
            keep = x
        elif need_a or need_b:  # sample whole batch items: the weight gradient sums over them
            rows, scale = sample_rows(x.shape[0], sample, x.device)
            keep = x if rows is None else x.index_select(0, rows)
        ctx.save_for_backward(w if need_x else None, keep, rows, a, b, prev, next, bias_prev, bias_next)
        ctx.scale, ctx.geometry, ctx.x_shape = scale, geometry, x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, keep, rows, a, b, prev, next, bias_prev, bias_next = ctx.saved_tensors
        need_x, need_a, need_b, need_p, need_n, need_bias, need_bp, need_bn = ctx.needs_input_grad[:8]
        stride, padding, dilation, groups = ctx.geometry
        args = (None, list(stride), list(padding), list(dilation), False, [0] * len(stride), groups)
        gx = ga = gb = gp = gn = db = None
        if need_x:  # the input gradient needs only the input's shape, as torch.nn.grad.conv2d_input does
            shape_only = dy.new_empty(1).expand(ctx.x_shape)
            gx = torch.ops.aten.convolution_backward(dy.to(w.dtype), shape_only, w, *args, (True, False, False))[0]
        if need_bias or need_bp or need_bn or (bias_prev is not None and (need_a or need_b)):
            db = dy.sum([d for d in range(dy.dim()) if d != 1])
        if keep is not None:
            d = (dy if rows is None else dy.index_select(0, rows)).to(keep.dtype)
            # the weight argument only lends its shape to the weight gradient
            dw = torch.ops.aten.convolution_backward(d, keep, prev.to(keep.dtype), *args, (False, True, False))[1]
            ga, gb = ab_from_dw(dw, prev, next)
            if need_p or need_n:
                dw = dw.to(prev.dtype)
                gp = dw * a.to(dw.dtype) if need_p else None
                gn = dw * b.to(dw.dtype) if need_n else None
        ga, gb = scalar_grads(ctx, ga, gb, db, bias_prev, bias_next, a, b)
        gbp = (db.to(bias_prev.dtype) * a.to(bias_prev.dtype)) if need_bp else None
        gbn = (db.to(bias_next.dtype) * b.to(bias_next.dtype)) if need_bn else None
        return gx, ga, gb, gp, gn, db if need_bias else None, gbp, gbn, None, None, None, None


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
    sample: float | None = None,
    out: torch.Tensor | None = None,
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
        sample: ``None`` for exact ``dL/da, dL/db``; a fraction in ``(0, 1]`` of the batch items.
        out: A tensor like ``prev`` to synthesize the weight into (as in :func:`mixed_linear`).

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
    if not needs_graph(x, a, b, prev, next, bp, bn):
        return _plain_conv(x, mix(a, b, prev, next), mix_bias(a, b, bias, bp, bn), geometry)
    return _MixedConv.apply(x, a, b, prev, next, bias, bp, bn, sample, autocast_dtype(x), geometry, out)


def _plain_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, geometry: Any) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(stride) - 1]  # the F functions honour autocast
    return conv(x, w, bias, stride, padding, dilation, groups)
