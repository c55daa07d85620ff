"""The forward and backward of the lean layers as plain functions, shared by eager mode and torch.compile.

:mod:`replace_wrap.synthesis.kernels` explains what the layers compute and keep. Its autograd Functions (eager
mode) and the custom operators of :mod:`replace_wrap.synthesis.compiled_ops` (under ``torch.compile``) run these
same functions, so the two modes compute, draw and keep the same tensors. What a layer keeps for its backward
depends only on shapes and settings (:func:`linear_plan`, :func:`conv_plan`), so compiled code can tell it
from fake tensors.

``needs`` is the Function's ``needs_input_grad``: whether ``x, a, b, prev, next, bias, bias_prev, bias_next``
receive gradient. ``scratch=False`` (the operators' shape functions, which run on fake tensors) makes the
synthesized weight a fresh tensor rather than this thread's scratch tensor.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .estimators import (
    ROW_PRODUCT_MAX,
    ab_from_dw,
    ab_from_one_product,
    mix_bias,
    sample_size,
    sample_units,
    scalar_grads,
    transposed,
)
from .maths import mix
from .patches import gather_at, gather_patches, grouped_product, locate

__all__ = [
    "INPUT",
    "NONE",
    "PATCH_KEEP_MAX",
    "SAMPLE",
    "Geometry",
    "autocast_linear",
    "autocast_off",
    "conv_backward",
    "conv_forward",
    "conv_plan",
    "conv_units",
    "linear_backward",
    "linear_forward",
    "linear_plan",
]

# A convolution's sampled patches are gathered in the forward when they are this small a part of its input;
# larger ones (3x3 and wider kernels) are gathered in the backward from the input, which the layer then keeps
# (in CNNs the layer after a ReLU shares it with the ReLU's backward, so keeping it costs nothing).
PATCH_KEEP_MAX = 1 / 8

# What a layer keeps of its input for the backward: nothing, the input itself (in the compute dtype), or the
# sampled units' rows / patches (a convolution whose patches are too large keeps the input instead).
NONE, INPUT, SAMPLE = "none", "input", "sample"

Geometry = tuple[Sequence[int], Sequence[int], Sequence[int], int]  # stride, padding, dilation, groups

_SCRATCH = threading.local()  # per thread: "flat" (dtype -> buffer), "views" ((shape, stride, dtype) -> view)


def _weight(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
            dtype: torch.dtype | None = None, scratch: bool = True) -> torch.Tensor:
    """The synthesized weight ``a * prev + b * next`` (cast as autocast has it), for use within one call only.

    Neither the forward nor the backward keeps it beyond its own product, so on the CPU it is written into this
    thread's scratch memory (:func:`_scratch_like`): a fresh weight-sized tensor per layer and call would come
    from the operating system and be faulted in page by page (measured at 2.6% of an HF ViT-B step). The same
    two passes as :func:`~replace_wrap.synthesis.maths.mix`: bitwise the same weight. Accelerator allocators
    cache blocks anyway, and a graph being traced allocates its own.
    """
    if not scratch or prev.device.type != "cpu" or torch.compiler.is_compiling():
        w = mix(a, b, prev, next)
    else:
        out = _scratch_like(prev)
        if a.dtype != prev.dtype:
            a, b = a.to(prev.dtype), b.to(prev.dtype)
        w = torch.mul(prev, a, out=out).addcmul_(next, b)
    return w if dtype is None else w.to(dtype)


def _scratch_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor of ``t``'s shape and dtype in this thread's scratch memory, laid out as
    ``torch.empty_like(t)`` would be (a transposed HF ``Conv1D`` weight, a channels-last kernel keep theirs).

    One flat buffer per dtype, as large as the largest weight seen, serves every layer and step: each layer
    uses it only within one call (one layer at a time per thread), so its views never overlap in time. One
    buffer per weight layout held the sum of the distinct layouts instead: 21 MiB for the fourteen of
    ResNet-50's replaced blocks, against 9 MiB for the largest. The view for each layout is made once (and
    again when the buffer grows): two operations fewer per synthesis.
    """
    key = (t.shape, t.stride(), t.dtype)
    scratch = _SCRATCH.__dict__
    views = scratch.setdefault("views", {})
    view = views.get(key)
    if view is not None:
        return view
    buffers = scratch.setdefault("flat", {})
    n = t.numel()
    flat = buffers.get(t.dtype)
    if flat is None or flat.numel() < n:
        flat = buffers[t.dtype] = torch.empty(n, dtype=t.dtype, device="cpu")  # whatever device context is active
        for old in [k for k in views if k[2] == t.dtype]:  # views of the old buffer: it is freed once they go
            del views[old]
    stride = torch.empty_like(t, device="meta").stride()  # empty_like's choice: the same strides when dense
    view = views[key] = flat[:n].as_strided(t.shape, stride)
    return view


def _coupled_grads(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, need_p: bool,
                   need_n: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    dw = dw.to(prev.dtype)
    return (dw * a.to(dw.dtype) if need_p else None), (dw * b.to(dw.dtype) if need_n else None)


def _finish(needs: Sequence[bool], ga: torch.Tensor | None, gb: torch.Tensor | None,
            db: torch.Tensor | None, one_product: bool, a: torch.Tensor, b: torch.Tensor,
            bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None) -> tuple[tuple[Any, Any], tuple[Any, ...]]:
    """Both layers' last step: ``(ga, gb)`` (with the mixed bias's share, which the one-product estimator already
    has) and the biases' gradients ``(own bias, bias_prev, bias_next)``, each ``None`` where not needed."""
    need_a, need_b, need_bias, need_bp, need_bn = needs[1], needs[2], needs[5], needs[6], needs[7]
    ga, gb = scalar_grads((need_a, need_b), ga, gb, None if one_product else db, bias_prev, bias_next, a, b)
    gbp = (db.to(bias_prev.dtype) * a.to(bias_prev.dtype)) if need_bp else None
    gbn = (db.to(bias_next.dtype) * b.to(bias_next.dtype)) if need_bn else None
    return (ga, gb), (db if need_bias else None, gbp, gbn)


def linear_plan(n: int, sample: float | str | None, needs: Sequence[bool]) -> tuple[str, bool]:
    """What a linear layer of ``n`` rows keeps: ``(NONE | INPUT | SAMPLE, whether the output at the units)``."""
    need_a, need_b, need_p, need_n = needs[1:5]
    if need_p or need_n:  # coupled: the neighbours need the full dW, so the scalars get it exactly too
        return INPUT, False
    if not (need_a or need_b):
        return NONE, False
    if sample_size(n, sample) < n:  # the sampled rows and their x @ W^T (+ mixed bias)
        return SAMPLE, True
    # exact: from dW = dy^T x, or (few rows) from the rows and their output, which the forward computed
    return INPUT, n <= ROW_PRODUCT_MAX


def linear_forward(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
    bias: torch.Tensor | None, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
    sample: float | str | None, dtype: torch.dtype | None, needs: Sequence[bool], scratch: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, float]:
    """``y`` and what the backward needs: ``(y, keep, rows, xw, scale)``; ``x`` of shape ``(N, in)``."""
    w = _weight(a, b, prev, next, scratch=scratch)  # used for y only: the backward synthesizes it again
    bias = mix_bias(a, b, bias, bias_prev, bias_next)
    if dtype is not None and bias is not None:
        bias = bias.to(dtype)  # (its cast is also what the output at the units is corrected by, below)
    x, y = autocast_linear(x, w, bias, dtype)
    # x: (N, in) rows (mixed_linear flattens the leading dimensions), y: (N, out)
    rows, scale, keep, xw = None, 1.0, None, None
    kind, with_output = linear_plan(x.shape[0], sample, needs)
    if kind == SAMPLE:
        rows, scale = sample_units(x.shape[0], sample, x.device)
    if kind != NONE:
        keep = x if rows is None else x.index_select(0, rows)
    if with_output:  # the units' x @ W^T (+ mixed bias), which the forward computed
        xw = y.clone() if rows is None else y.index_select(0, rows)
        if bias is not None and bias_prev is None:  # an own bias is no part of the mix
            xw.sub_(bias)
    return y, keep, rows, xw, scale


def autocast_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, F.linear(x, w, bias))`` computed as ``F.linear`` under autocast would (``dtype``: autocast's, or
    ``None``), with ``x`` as the product read it (cast): what a layer keeps of it is in the compute dtype."""
    if dtype is None:
        return x, F.linear(x, w, bias)
    x, w = x.to(dtype), w.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with autocast_off(x.device):
        return x, F.linear(x, w, bias)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context without autocast on ``device``'s type (nothing to undo where it is off or unavailable)."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def _own_dtypes(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Run a layer's backward with autocast off: it computes in the dtypes its forward chose (``dtype``), and a
    ``loss.backward()`` called inside an autocast region (which PyTorch advises against, but allows) would
    otherwise recast its products (a bf16 product against an fp32 output gradient)."""
    @functools.wraps(backward)
    def run(dy: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with autocast_off(dy.device):
            return backward(dy, *args, **kwargs)

    return run


@_own_dtypes
def linear_backward(
    dy: torch.Tensor, keep: torch.Tensor | None, rows: torch.Tensor | None, xw: torch.Tensor | None,
    a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor, bias_prev: torch.Tensor | None,
    bias_next: torch.Tensor | None, scale: float, host: bool, dtype: torch.dtype | None, needs: Sequence[bool],
    scratch: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``x, a, b, prev, next, bias, bias_prev, bias_next`` (``None`` where not needed)."""
    need_x, need_a, need_b, need_p, need_n, need_bias, need_bp, need_bn = needs[:8]
    gx = ga = gb = gp = gn = db = None
    if need_x:
        w = _weight(a, b, prev, next, dtype, scratch)
        gx = dy.to(w.dtype) @ w  # shape: (N, out) @ (out, in) -> (N, in)
        del w
    if need_bias or need_bp or need_bn or (bias_prev is not None and (need_a or need_b) and xw is None):
        db = dy.sum(0)  # the bias's gradient, over all rows
    if xw is not None:  # the mixed bias's share of dL/da, dL/db is taken over the same units
        d = dy if rows is None else dy.index_select(0, rows)
        ga, gb = ab_from_one_product(d, keep, xw, a, b, prev, next, bias_prev, bias_next, host, scale=scale)
    elif keep is not None:  # exact (the plan samples only with the output kept): no rescale
        d = dy.to(keep.dtype)
        # dW in the memory layout of the neighbours' weights (no copy for the dot products)
        dw = (keep.t() @ d).t() if transposed(prev) else d.t() @ keep  # shape: (out, N) @ (N, in)
        ga, gb = ab_from_dw(dw, prev, next)
        if need_p or need_n:
            gp, gn = _coupled_grads(dw, a, b, prev, need_p, need_n)
    (ga, gb), biases = _finish(needs, ga, gb, db, xw is not None, a, b, bias_prev, bias_next)
    return gx, ga, gb, gp, gn, *biases


def conv_units(y_shape: Sequence[int]) -> int:
    """A convolution's units, which its estimator samples: the output positions of every batch item
    (``y_shape = (N, out, *spatial)``)."""
    return y_shape[0] * math.prod(y_shape[2:])


def conv_plan(x_shape: Sequence[int], y_shape: Sequence[int], w_shape: Sequence[int], groups: int,
              sample: float | str | None, needs: Sequence[bool]) -> tuple[str, bool]:
    """What a convolution keeps: ``(NONE | INPUT | SAMPLE, whether the output at the units)``.

    Its units are the output positions of every batch item (``y_shape = (N, out, *spatial)``). Sampled, it keeps
    the output there and the patches the kernel reads there (``SAMPLE``) when they are small, else the input.
    """
    need_a, need_b, need_p, need_n = needs[1:5]
    if need_p or need_n:
        return INPUT, False
    if not (need_a or need_b):
        return NONE, False
    n = conv_units(y_shape)
    m = sample_size(n, sample)
    if m >= n:  # exact: from dW
        return INPUT, False
    return (SAMPLE if m * math.prod(w_shape[1:]) * groups <= PATCH_KEEP_MAX * math.prod(x_shape) else INPUT), True


def conv_forward(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
    bias: torch.Tensor | None, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
    sample: float | str | None, dtype: torch.dtype | None, geometry: Geometry, needs: Sequence[bool],
    scratch: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, float]:
    """``y`` and what the backward needs: ``(y, keep, units, xw, scale)``; ``x`` of shape ``(N, in, *spatial)``."""
    stride, padding, dilation, groups = geometry
    w = _weight(a, b, prev, next, scratch=scratch)  # used for y only: the backward synthesizes it again
    bias = mix_bias(a, b, bias, bias_prev, bias_next)
    if dtype is not None:
        x, w = x.to(dtype), w.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    y = torch.convolution(x, w, bias, stride, padding, dilation, False, [0] * len(stride), groups)
    units, scale, keep, xw = None, 1.0, None, None
    kind, with_output = conv_plan(x.shape, y.shape, prev.shape, groups, sample, needs)
    if kind != NONE:
        keep = x
    if with_output:  # units: output positions of every batch item, shape (N, out, *spatial)
        units, scale = sample_units(conv_units(y.shape), sample, x.device)
        where = locate(units, y.shape[2:])
        xw = gather_at(y, where)  # shape: (m, out): the forward's output at the sampled positions
        if bias is not None and bias_prev is None:
            xw.sub_(bias)
        if kind == SAMPLE:
            keep = gather_patches(x, where, tuple(prev.shape[2:]), stride, padding, dilation, tuple(y.shape[2:]),
                                  cache=scratch)
    return y, keep, units, xw, scale


@_own_dtypes
def conv_backward(
    dy: torch.Tensor, keep: torch.Tensor | None, units: torch.Tensor | None, xw: torch.Tensor | None,
    a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor, bias_prev: torch.Tensor | None,
    bias_next: torch.Tensor | None, scale: float, host: bool, dtype: torch.dtype | None, needs: Sequence[bool],
    geometry: Geometry, x_shape: Sequence[int], patches: bool, scratch: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``x, a, b, prev, next, bias, bias_prev, bias_next``; ``patches``: ``keep`` is patches."""
    need_x, need_a, need_b, need_p, need_n, need_bias, need_bp, need_bn = needs[:8]
    stride, padding, dilation, groups = geometry
    args = (None, list(stride), list(padding), list(dilation), False, [0] * len(stride), groups)
    gx = ga = gb = gp = gn = db = None
    if need_x:
        w = _weight(a, b, prev, next, dtype, scratch)
        gx = _input_grad(dy.to(w.dtype), w, x_shape, stride, padding, dilation, groups)
        del w
    if need_bias or need_bp or need_bn or (bias_prev is not None and (need_a or need_b) and xw is None):
        db = dy.sum([d for d in range(dy.dim()) if d != 1])
    if xw is not None:
        where = locate(units, dy.shape[2:])
        d = gather_at(dy, where)  # shape: (m, out)
        xs = keep if patches else gather_patches(keep, where, tuple(prev.shape[2:]), stride, padding, dilation,
                                                 tuple(dy.shape[2:]), cache=scratch)
        ga, gb = ab_from_one_product(d, xs, xw, a, b, prev, next, bias_prev, bias_next, host,
                                     grouped_product(groups), scale)
    elif keep is not None:  # exact (the plan samples only with the output kept): no rescale
        d = dy.to(keep.dtype)
        # the weight argument only lends its shape to the weight gradient
        dw = torch.ops.aten.convolution_backward(d, keep, prev.to(keep.dtype), *args, (False, True, False))[1]
        ga, gb = ab_from_dw(dw, prev, next)
        if need_p or need_n:
            gp, gn = _coupled_grads(dw, a, b, prev, need_p, need_n)
    (ga, gb), biases = _finish(needs, ga, gb, db, xw is not None, a, b, bias_prev, bias_next)
    return gx, ga, gb, gp, gn, *biases


def _input_grad(dy: torch.Tensor, w: torch.Tensor, x_shape: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
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
