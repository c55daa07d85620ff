"""The built-in layer kernels, registered in lookup order: ``nn.Linear``, ``nn.Conv1d/2d/3d``, HF ``Conv1D``, and
RMS norms (``nn.RMSNorm`` and the classes that declare themselves one to Hugging Face's kernel hub).

Each reads its synthesized weight's sources through :func:`~replace_wrap.synthesis.layer_kernels.mix_source`
(which returns ``None`` where the fast path must not be used: then the kernel declines with
``NotImplemented`` and the layer's own forward runs on the property path) and computes with
:func:`~replace_wrap.synthesis.kernels.mixed_linear` / :func:`~replace_wrap.synthesis.kernels.mixed_conv`.
RMS norms run their own forward with a sampled estimate of the scalars' gradient
(:mod:`~replace_wrap.synthesis.row_kernels`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..integrations.fsdp_sampled import sharded_linear
from .kernels import mixed_conv, mixed_linear
from .layer_kernels import mix_source, register_layer_kernel
from .row_kernels import declares_rms_norm, row_forward

__all__: list[str] = []

# What the kernels' estimators sample, in the words of reports.
ROWS = "rows (tokens)"
POSITIONS = "output positions (batch x spatial)"


# Without gradients an evaluating layer takes the generic path; a training one runs its kernel, which draws the
# random units a forward with gradients would (reentrant checkpointing runs both: mixed_linear says why).
def _linear(layer: nn.Module, x: torch.Tensor, stored_transposed: bool) -> Any:
    if not (torch.is_grad_enabled() or layer.training):
        return NotImplemented
    src = _source(layer)
    if src is None:  # FSDP2 shards: the gathered weight with a sampled scalar gradient, or the generic path
        return sharded_linear(layer, x, stored_transposed)
    prev, nxt, remake = src.prev, src.next, src.remake
    if stored_transposed:
        prev, nxt = prev.t(), nxt.t()
        if remake is not None:
            remake = (*remake[:2], _transposed(remake[2]))
    return mixed_linear(x, src.a, src.b, prev, nxt, src.bias, bias_mix=src.bias_mix, sample=src.sample, remake=remake,
                        training=layer.training)


def _source(layer: nn.Module) -> Any:
    # Read with gradients enabled: which of a, b, prev, next require grad is then what a forward with gradients
    # sees (computed scalars of rule="convex", zero-padded coupled neighbours), so the no-grad draw matches it.
    if torch.is_grad_enabled():
        return mix_source(layer)
    with torch.enable_grad():
        return mix_source(layer)


def _transposed(fn: Any) -> Any:
    def remake(p: torch.Tensor | None, n: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        p, n = fn(p, n)
        return p.t(), n.t()

    return remake


@register_layer_kernel(nn.Linear, name="linear", units=ROWS, sharded="out_in")
def _linear_forward(layer: nn.Linear, input: torch.Tensor) -> Any:
    return _linear(layer, input, stored_transposed=False)


def _conv_check(layer: nn.Module) -> str | None:
    if isinstance(layer.padding, str):  # type: ignore[attr-defined]
        return f"padding={layer.padding!r} (may pad asymmetrically)"  # type: ignore[attr-defined]
    if layer.padding_mode != "zeros":  # type: ignore[attr-defined]
        return f"padding_mode={layer.padding_mode!r}"  # type: ignore[attr-defined]
    return None


@register_layer_kernel(nn.Conv1d, nn.Conv2d, nn.Conv3d, name="conv", check=_conv_check, units=POSITIONS)
def _conv_forward(layer: nn.modules.conv._ConvNd, input: torch.Tensor) -> Any:
    if (
        not (torch.is_grad_enabled() or layer.training)  # as _linear
        or input.dim() != len(layer.kernel_size) + 2  # unbatched input: F.conv handles it
        or _conv_check(layer) is not None
    ):
        return NotImplemented
    src = _source(layer)
    if src is None:
        return NotImplemented
    return mixed_conv(
        input, src.a, src.b, src.prev, src.next, src.bias, bias_mix=src.bias_mix, stride=layer.stride,
        padding=layer.padding, dilation=layer.dilation, groups=layer.groups, sample=src.sample, remake=src.remake,
        training=layer.training,
    )


# GPT-2's (and GPT-1's, CTRL's ...) projection: y = x @ W + b with W stored as (in, out). Named by its import
# path: it is resolved only once transformers has imported it, so `import replace_wrap` imports no transformers.
@register_layer_kernel("transformers.pytorch_utils.Conv1D", name="hf_conv1d", units=ROWS, sharded="in_out")
def _hf_conv1d_forward(layer: nn.Module, x: torch.Tensor) -> Any:
    # (out, in) views of the (in, out) storage: no copy; the synthesized weight keeps that layout
    return _linear(layer, x, stored_transposed=True)


# Row-wise by definition: each output row is its input row normalized and scaled. The kernel runs the class's own
# forward (its casts, any offset of the weight), so any RMS norm that declares itself one is served.
@register_layer_kernel(nn.RMSNorm, name="rms_norm", units=ROWS, declared=declares_rms_norm, exact=False)
def _rms_norm_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return row_forward(layer, *args, **kwargs)
