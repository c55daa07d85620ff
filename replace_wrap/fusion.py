"""The weight-synthesis maths as pure tensor functions.

Nothing here knows about modules or policies, so each function can be property-tested on its own.
"""

from __future__ import annotations

import torch

__all__ = ["mix"]


def mix(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor) -> torch.Tensor:
    """Synthesize ``a * prev + b * next``.

    The coefficients are fp32 scalars (0-d tensors) whatever the weights' dtype; they are cast to the weights'
    dtype so the result has the dtype of ``prev`` (bf16 weights give a bf16 tensor, gradients still reach the
    fp32 scalars through the cast).

    Args:
        a: Coefficient of ``prev``, a 0-d tensor (or of shape ``(1,)`` when ``prev`` has dimensions).
        b: Coefficient of ``next``, of the shape of ``a``.
        prev: The tensor of the previous block.
        next: The same tensor of the next block, of the same shape.

    Returns:
        A tensor of the shape and dtype of ``prev``.

    Example:
        >>> mix(torch.tensor(0.5), torch.tensor(0.5), torch.ones(2), torch.zeros(2))
        tensor([0.5000, 0.5000])
    """
    # shape: prev, next: S ; a, b: () -> S
    # Two passes over the weights (a * prev, then next * b accumulated in place) instead of three; the
    # in-place step is autograd-safe: mul saves its inputs, not its output.
    dtype = prev.dtype
    return (prev * a.to(dtype)).addcmul_(next, b.to(dtype))
