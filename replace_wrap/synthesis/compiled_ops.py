"""The lean layers under ``torch.compile``: custom operators with a registered autograd formula.

Compiled as autograd Functions, the lean layers of :mod:`replace_wrap.synthesis.kernels` cost memory that eager
mode does not (issue 12: a compiled ViT-S peaked at 1.13x the frozen baseline, where eager mode takes 0.93x):

- AOTAutograd traces forward and backward into one graph, where the forward's and the backward's synthesis of
  ``W = a * W_prev + b * W_next`` are one expression of the same inputs. Its common-subexpression pass merges
  them, and its partitioner keeps the merged ``W`` from the forward for the backward rather than recompute it
  (the backward's product must materialize it, which it counts as too costly to recompute): a weight-sized tensor
  per replaced layer from forward to backward, where a frozen layer keeps only its own parameter.
- AOTAutograd never caches a graph that holds a custom ``autograd.Function`` (it cannot tell when the Python
  changes), so each process traces and partitions the whole model again and keeps what that leaves behind, where
  a frozen model's graph comes from the cache.

So while compiling, a lean layer is two operators (``torch.library.custom_op``), its forward and its backward,
tied by ``torch.library.register_autograd``, and both run the functions of
:mod:`replace_wrap.synthesis.lean_layers` on real tensors at run time, as eager mode does. The graph sees the
operators' inputs and outputs only: ``W`` never enters it, exactly what eager mode saves crosses from forward to
backward, the graph is cacheable, and outputs, gradients and random draws are eager mode's.

An operator takes tensors, numbers, strings and lists only: ``sample`` travels as a string, the ``needs_input_grad``
flags as a list, and a kept tensor that would be ``None`` or the operator's own input comes back as an empty
placeholder, which ``setup_context`` replaces by ``None`` or the input, knowing the plan from shapes.

AOTAutograd caches a compiled graph under the graph that dynamo traced, which holds the forward operators only:
the backward traced from their autograd formula, and the shape functions, are no part of the key. So each forward
operator also takes a digest of this subpackage's code (:data:`CODE`), and a cached graph never outlives the
code it was traced from (a new release, an edited checkout).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from .estimators import AUTO, requires_grad, scalars_on_host
from .lean_layers import (
    INPUT,
    NONE,
    SAMPLE,
    Geometry,
    conv_backward,
    conv_forward,
    conv_plan,
    conv_units,
    linear_backward,
    linear_forward,
    linear_plan,
)

__all__ = ["CODE", "compiled_conv", "compiled_linear"]

Tensor = torch.Tensor
_TENSORS = "Tensor x, Tensor a, Tensor b, Tensor prev, Tensor next, Tensor? bias, Tensor? bias_prev, Tensor? bias_next"
_SAVED = "Tensor? keep, Tensor? units, Tensor? xw, Tensor a, Tensor b, Tensor prev, Tensor next, Tensor? bias_prev, " \
         "Tensor? bias_next"
_GEOMETRY = "int[] stride, int[] padding, int[] dilation, int groups"


def _digest() -> str:
    code = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):  # none when imported from an archive: the version
        code.update(path.read_bytes())
    return code.hexdigest()[:16]


CODE = _digest()  # what the compiled graphs were traced from; see the module docstring


def _encode(sample: float | str | None) -> str | None:
    return sample if sample is None or sample == AUTO else repr(float(sample))  # type: ignore[return-value]


def _decode(sample: str | None) -> float | str | None:
    return None if sample is None else AUTO if sample == AUTO else float(sample)


def _out(t: Tensor | None, like: Tensor, *inputs: Tensor) -> Tensor:
    # An operator returns no None and no alias of its inputs: an empty placeholder instead.
    return like.new_empty(0) if t is None or any(t is i for i in inputs) else t


def _grads(grads: Sequence[Tensor | None], like: Tensor) -> list[Tensor]:
    return [like.new_empty(0) if g is None else g for g in grads]


def _scale(n: int, units: Tensor | None, fake: bool) -> float:
    # The sampled sums' rescale n / m, as sample_units gave it to the forward; from shapes at run time, so that
    # no number derived from a symbolic shape enters the graph (it would specialize it). Shapes need no values.
    return 1.0 if fake or units is None else n / units.shape[0]


def _kept(kind: str, sampled: bool, with_output: bool, x: Tensor, dtype: torch.dtype | None, keep: Tensor,
          units: Tensor, xw: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The forward operator's placeholders replaced as :func:`_out` made them (``kind``, ``with_output``: the plan)."""
    if kind == INPUT and (dtype is None or dtype == x.dtype):  # not cast: the input itself
        keep = x
    return (None if kind == NONE else keep), (units if sampled else None), (xw if with_output else None)


# --- linear ---------------------------------------------------------------------------------------------------

def _linear(x: Tensor, a: Tensor, b: Tensor, prev: Tensor, next: Tensor, bias: Tensor | None,
            bias_prev: Tensor | None, bias_next: Tensor | None, sample: str | None, dtype: torch.dtype | None,
            needs: list[bool], code: str, fake: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, keep, rows, xw, _ = linear_forward(x, a, b, prev, next, bias, bias_prev, bias_next, _decode(sample), dtype,
                                          needs, scratch=not fake)
    return y, _out(keep, y, x), _out(rows, y), _out(xw, y)


def _linear_backward(dy: Tensor, keep: Tensor | None, rows: Tensor | None, xw: Tensor | None, a: Tensor, b: Tensor,
                     prev: Tensor, next: Tensor, bias_prev: Tensor | None, bias_next: Tensor | None,
                     dtype: torch.dtype | None, needs: list[bool], fake: bool = False) -> list[Tensor]:
    scale = _scale(dy.shape[0], rows, fake)
    host = not fake and scalars_on_host(a)  # at run time the scalars are read as eager mode reads them
    return _grads(linear_backward(dy, keep, rows, xw, a, b, prev, next, bias_prev, bias_next, scale, host, dtype,
                                  needs, scratch=not fake), dy)


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, a, b, prev, next, _, bias_prev, bias_next, sample, dtype, needs, _ = inputs
    y, keep, rows, xw = output
    kind, with_output = linear_plan(x.shape[0], _decode(sample), needs)
    kept = _kept(kind, kind == SAMPLE, with_output, x, dtype, keep, rows, xw)
    ctx.save_for_backward(*kept, a, b, prev, next, bias_prev, bias_next)
    ctx.dtype, ctx.needs = dtype, needs
    ctx.mark_non_differentiable(keep, rows, xw)
    ctx.set_materialize_grads(False)


def _linear_autograd(ctx: Any, dy: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    grads = torch.ops.replace_wrap.lean_linear_backward(dy, *ctx.saved_tensors, ctx.dtype, ctx.needs)
    return *(g if need else None for g, need in zip(grads, ctx.needs)), None, None, None, None


def compiled_linear(x: Tensor, a: Tensor, b: Tensor, prev: Tensor, next: Tensor, bias: Tensor | None,
                    bias_prev: Tensor | None, bias_next: Tensor | None, sample: float | str | None,
                    dtype: torch.dtype | None) -> Tensor:
    """:func:`~replace_wrap.synthesis.kernels.mixed_linear`'s Function as the operator: ``x`` of shape ``(N, in)``."""
    needs = requires_grad(x, a, b, prev, next, bias, bias_prev, bias_next)
    return torch.ops.replace_wrap.lean_linear(x, a, b, prev, next, bias, bias_prev, bias_next, _encode(sample),
                                              dtype, needs, CODE)[0]


# --- convolution ----------------------------------------------------------------------------------------------

def _conv(x: Tensor, a: Tensor, b: Tensor, prev: Tensor, next: Tensor, bias: Tensor | None,
          bias_prev: Tensor | None, bias_next: Tensor | None, sample: str | None, dtype: torch.dtype | None,
          stride: list[int], padding: list[int], dilation: list[int], groups: int, needs: list[bool], code: str,
          fake: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    geometry = (stride, padding, dilation, groups)
    y, keep, units, xw, _ = conv_forward(x, a, b, prev, next, bias, bias_prev, bias_next, _decode(sample), dtype,
                                         geometry, needs, scratch=not fake)
    return y, _out(keep, y, x), _out(units, y), _out(xw, y)


def _conv_backward(dy: Tensor, keep: Tensor | None, units: Tensor | None, xw: Tensor | None, a: Tensor, b: Tensor,
                   prev: Tensor, next: Tensor, bias_prev: Tensor | None, bias_next: Tensor | None,
                   dtype: torch.dtype | None, needs: list[bool], stride: list[int], padding: list[int],
                   dilation: list[int], groups: int, x_shape: list[int], patches: bool,
                   fake: bool = False) -> list[Tensor]:
    scale = _scale(conv_units(dy.shape), units, fake)
    host = not fake and scalars_on_host(a)
    return _grads(conv_backward(dy, keep, units, xw, a, b, prev, next, bias_prev, bias_next, scale, host, dtype,
                                needs, (stride, padding, dilation, groups), x_shape, patches, scratch=not fake), dy)


def _conv_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, a, b, prev, next, _, bias_prev, bias_next, sample, dtype, stride, padding, dilation, groups, needs, _ = inputs
    y, keep, units, xw = output
    kind, with_output = conv_plan(x.shape, y.shape, prev.shape, groups, _decode(sample), needs)
    kept = _kept(kind, with_output, with_output, x, dtype, keep, units, xw)  # sampled: the output there is kept
    ctx.save_for_backward(*kept, a, b, prev, next, bias_prev, bias_next)
    ctx.args = (dtype, needs, stride, padding, dilation, groups, list(x.shape), kind == SAMPLE)
    ctx.needs = needs
    ctx.mark_non_differentiable(keep, units, xw)
    ctx.set_materialize_grads(False)


def _conv_autograd(ctx: Any, dy: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    grads = torch.ops.replace_wrap.lean_conv_backward(dy, *ctx.saved_tensors, *ctx.args)
    return *(g if need else None for g, need in zip(grads, ctx.needs)), *([None] * 8)


def compiled_conv(x: Tensor, a: Tensor, b: Tensor, prev: Tensor, next: Tensor, bias: Tensor | None,
                  bias_prev: Tensor | None, bias_next: Tensor | None, sample: float | str | None,
                  dtype: torch.dtype | None, geometry: Geometry) -> Tensor:
    """:func:`~replace_wrap.synthesis.kernels.mixed_conv`'s Function as the operator."""
    needs = requires_grad(x, a, b, prev, next, bias, bias_prev, bias_next)
    return torch.ops.replace_wrap.lean_conv(x, a, b, prev, next, bias, bias_prev, bias_next, _encode(sample), dtype,
                                            *geometry, needs, CODE)[0]


# --- registration: each operator's shape function is the operator itself on fake tensors ----------------------

_FORWARD = "(Tensor, Tensor, Tensor, Tensor)"  # y, then the kept tensors (or placeholders)
_OPS = (
    ("lean_linear", f"({_TENSORS}, str? sample, ScalarType? dtype, bool[] needs, str code) -> {_FORWARD}", _linear,
     (_linear_autograd, _linear_setup)),
    ("lean_linear_backward", f"(Tensor dy, {_SAVED}, ScalarType? dtype, bool[] needs) -> Tensor[]",
     _linear_backward, None),
    ("lean_conv", f"({_TENSORS}, str? sample, ScalarType? dtype, {_GEOMETRY}, bool[] needs, str code) -> {_FORWARD}",
     _conv, (_conv_autograd, _conv_setup)),
    ("lean_conv_backward", f"(Tensor dy, {_SAVED}, ScalarType? dtype, bool[] needs, {_GEOMETRY}, "
                           "SymInt[] x_shape, bool patches) -> Tensor[]", _conv_backward, None),
)
for _name, _schema, _fn, _autograd in _OPS:
    _op = torch.library.custom_op(f"replace_wrap::{_name}", _fn, mutates_args=(), schema=_schema)
    _op.register_fake(lambda *args, _fn=_fn: _fn(*args, fake=True))
    if _autograd is not None:
        _op.register_autograd(_autograd[0], setup_context=_autograd[1])
del _name, _schema, _fn, _autograd, _op
