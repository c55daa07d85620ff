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
  costs one thin product (two on an accelerator, where the scalars are not read on the host).

When the neighbours receive gradient too (``neighbour_grad="coupled"``), ``dW`` is needed anyway: it is formed
from all units and the scalar gradients are exact whatever ``sample`` says.

The synthesized ``W`` is not kept from the forward: the backward synthesizes it again for the input gradient (one
pass over three weight-sized tensors, a fraction of a percent of the layer's products), so between the forward
and the backward a replaced layer holds no weight at all, where a frozen layer holds its own.

Under autocast the layer computes in the autocast dtype, as ``F.linear`` / ``F.conv2d`` would.

A training forward without gradients (``training=True``) draws the units a forward with gradients would draw, and
drops them: reentrant gradient checkpointing runs a segment first without gradients and again, from the same
state of the random generator, with them; a dropout after the layer must draw the same mask both times.

In eager mode a layer is an autograd Function; under ``torch.compile`` it is a pair of custom operators
(:mod:`replace_wrap.synthesis.compiled_ops`, which says why). Both run the functions of
:mod:`replace_wrap.synthesis.lean_layers`: the same outputs, gradients, random draws and saved tensors.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..errors import CompatibilityError
from .compiled_ops import compiled_conv, compiled_linear
from .estimators import (
    autocast_dtype,
    bias_sources,
    check_sample,
    mix_bias,
    needs_graph,
    requires_grad,
    sample_units,
    scalars_on_host,
)
from .lean_layers import (PATCH_KEEP_MAX, SAMPLE, conv_backward, conv_forward, conv_plan, conv_units,
                          linear_backward, linear_forward, linear_plan)
from .maths import mix

__all__ = ["PATCH_KEEP_MAX", "first_order", "mixed_conv", "mixed_linear"]


# (source prev, source next, remake): remake(source prev, source next) -> (prev, next), see mixed_linear
Remake = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Callable[..., tuple[torch.Tensor, torch.Tensor]]]


def _save(ctx: Any, remake: Remake | None, keep: Any, units: Any, xw: Any, a: torch.Tensor, b: torch.Tensor,
          prev: torch.Tensor, next: torch.Tensor, bias_prev: Any, bias_next: Any) -> None:
    if remake is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
        remake = None  # coupled: autograd takes the neighbours' gradients back through the copies
    if remake is not None:  # keep the sources, which their blocks hold anyway, rather than adapted copies
        prev, next = remake[0], remake[1]
    ctx.remake = None if remake is None else remake[2]
    ctx.save_for_backward(keep, units, xw, a, b, prev, next, bias_prev, bias_next)


def _saved(ctx: Any) -> tuple[Any, ...]:
    keep, units, xw, a, b, prev, next, bias_prev, bias_next = ctx.saved_tensors
    if ctx.remake is not None:
        prev, next = ctx.remake(prev, next)
    return keep, units, xw, a, b, prev, next, bias_prev, bias_next


def first_order(backward: Callable[..., Any]) -> Any:
    """``once_differentiable``, refusing up front where a second derivative is being built (``create_graph=True``:
    a gradient penalty, a Hessian-vector product) with a typed error that says how to get one."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def run(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise CompatibilityError(
                "a replaced layer's backward computes the scalars' gradient directly (the lean layer kernels) and "
                "cannot be differentiated again (backward with create_graph=True: gradient penalties, Hessian-vector "
                "products, meta-learning). Convert with fast_path=False for second-order gradients: the replaced "
                "layers then use plain autograd."
            )
        return once(ctx, *grads)

    return run


class _MixedLinear(torch.autograd.Function):
    # Eager mode only; compiled, the layer is the operator of compiled_ops (see the module docstring).
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
        bias: torch.Tensor | None, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
        sample: float | str | None, dtype: torch.dtype | None, remake: Remake | None,
    ) -> torch.Tensor:
        y, keep, rows, xw, scale = linear_forward(x, a, b, prev, next, bias, bias_prev, bias_next, sample, dtype,
                                                  ctx.needs_input_grad)
        # Everything through save_for_backward, so checkpointing (recompute=True) can drop and replay it. The
        # synthesized weight is not kept: the backward makes it again (one pass over the weights), so between
        # forward and backward a replaced layer holds no weight at all, where a frozen one holds its own.
        _save(ctx, remake, keep, rows, xw, a, b, prev, next, bias_prev, bias_next)
        ctx.scale, ctx.host, ctx.dtype = scale, scalars_on_host(a), dtype
        return y

    @staticmethod
    @first_order
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = linear_backward(dy, *_saved(ctx), ctx.scale, ctx.host, ctx.dtype, ctx.needs_input_grad)
        return *grads, None, None, None


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
    remake: Remake | None = None,
    training: bool = False,
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
        remake: For ``prev``, ``next`` that are detached copies made from other tensors (shape-adapted
            neighbours: zero-padded, or zeros for an absent side): ``(source_prev, source_next, fn)`` with
            ``fn(source_prev, source_next) == (prev, next)``. The layer then keeps the sources for its
            backward, which remakes the copies, so no weight-sized copy is held between forward and backward.
        training: The layer is training: without gradients it draws (and drops) the sample a forward with
            gradients draws, so that both advance the random generator alike (see the module docstring).

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
        if training:
            n, needs = x.numel() // max(1, x.shape[-1]), requires_grad(x, a, b, prev, next, bias, bp, bn)
            if any(needs) and linear_plan(n, sample, needs)[0] == SAMPLE:  # as linear_forward draws
                sample_units(n, sample, x.device)
        return F.linear(x, mix(a, b, prev, next), mix_bias(a, b, bias, bp, bn))
    # The Function sees rows only: F.linear with a bias returns a view for inputs of more than two dimensions,
    # and a view made inside a custom Function cannot be modified in place afterwards (an inplace ReLU after a
    # linear layer, Swin-v2's position-bias MLP). Reshaped out here, it is an ordinary view autograd tracks.
    # shape: x (..., in) -> (N, in) -> y (N, out) -> (..., out)
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        y = compiled_linear(rows, a, b, prev, next, bias, bp, bn, sample, autocast_dtype(x))
    else:
        y = _MixedLinear.apply(rows, a, b, prev, next, bias, bp, bn, sample, autocast_dtype(x), remake)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class _MixedConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
        bias: torch.Tensor | None, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
        sample: float | str | None, dtype: torch.dtype | None,
        geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int], remake: Remake | None,
    ) -> torch.Tensor:
        y, keep, units, xw, scale = conv_forward(x, a, b, prev, next, bias, bias_prev, bias_next, sample, dtype,
                                                 geometry, ctx.needs_input_grad)
        _save(ctx, remake, keep, units, xw, a, b, prev, next, bias_prev, bias_next)  # no weight: see _MixedLinear
        ctx.patches = conv_plan(x.shape, y.shape, prev.shape, geometry[3], sample, ctx.needs_input_grad)[0] == SAMPLE
        ctx.scale, ctx.geometry, ctx.x_shape, ctx.host, ctx.dtype = scale, geometry, x.shape, scalars_on_host(a), dtype
        return y

    @staticmethod
    @first_order
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = conv_backward(dy, *_saved(ctx), ctx.scale, ctx.host, ctx.dtype, ctx.needs_input_grad,
                              ctx.geometry, ctx.x_shape, ctx.patches)
        return *grads, None, None, None, None


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
    remake: Remake | None = None,
    training: bool = False,
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
        remake: As for :func:`mixed_linear`.
        training: As for :func:`mixed_linear`.

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
        y = _plain_conv(x, mix(a, b, prev, next), mix_bias(a, b, bias, bp, bn), geometry)
        if training:
            needs = requires_grad(x, a, b, prev, next, bias, bp, bn)
            if any(needs) and conv_plan(x.shape, y.shape, prev.shape, geometry[3], sample, needs)[1]:
                sample_units(conv_units(y.shape), sample, x.device)  # as conv_forward draws
        return y
    if torch.compiler.is_compiling():
        return compiled_conv(x, a, b, prev, next, bias, bp, bn, sample, autocast_dtype(x), geometry)
    return _MixedConv.apply(x, a, b, prev, next, bias, bp, bn, sample, autocast_dtype(x), geometry, remake)


def _plain_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, geometry: Any) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(stride) - 1]  # the F functions honour autocast
    return conv(x, w, bias, stride, padding, dilation, groups)
