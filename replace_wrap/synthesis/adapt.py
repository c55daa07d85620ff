"""Shape-adapting fusion: parameter-free maps from a neighbour's tensor to the replaced block's shape.

A replaced block's tensor ``W_i`` (shape ``T``) is synthesized as ``a * adapt(W_prev) + b * adapt(W_next)``.
When a neighbour's same-named tensor has another shape ``S`` (the first block of a CNN stage is wider, a
kernel is larger), it is mapped to ``T`` one dimension at a time:

* ``S[d] > T[d]``: keep ``T[d]`` entries of dimension ``d`` (**slice**);
* ``S[d] < T[d]``: put the ``S[d]`` entries into ``T[d]`` zeros (**zero-pad**);
* ``S[d] == T[d]``: unchanged.

Which entries line up is the *alignment* of the dimension: ``"start"`` (entry ``j`` of the source is entry
``j`` of the target; used for channel, feature and token dimensions) or ``"centre"`` (the centres line up,
the offset rounded down; used for the spatial dimensions of a convolution kernel, so that a 5x5 kernel
cropped to 3x3 keeps its middle and a 3x3 kernel padded to 5x5 sits in the middle). A side without a usable
counterpart contributes zeros (an *absent* :class:`ShapeAdapter`).

Every map here is linear (a crop or a zero-pad), so ``a * adapt(P) + b * adapt(N)`` stays linear in the
neighbours and ``merge`` through adapters is exact. Nothing here knows about modules: the caller decides
which dimensions are centre-aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ShapeAdapter", "adapt", "adapt_pair", "offset"]


def offset(source: int, target: int, centre: bool) -> int:
    """Where source entry 0 lands in the target along one dimension (negative: the source is cropped).

    ``start`` alignment always gives 0. ``centre`` alignment lines up the middles, rounding the offset down:
    ``offset(5, 3, True) == -1`` (crop one entry on the left), ``offset(3, 5, True) == 1``.

    Example:
        >>> offset(3, 5, centre=True), offset(5, 3, centre=True), offset(5, 3, centre=False)
        (1, -1, 0)
    """
    if not centre:
        return 0
    return (target - source) // 2 if target >= source else -((source - target) // 2)


def adapt(t: torch.Tensor, shape: Sequence[int], centre: Sequence[int] = ()) -> torch.Tensor:
    """Slice or zero-pad ``t`` along each dimension to ``shape``.

    Args:
        t: The source tensor, with ``len(shape)`` dimensions.
        shape: The target shape.
        centre: Dimensions aligned at their centres (conv kernel dimensions); the others are aligned at the
            start. Negative indices count from the end.

    Returns:
        ``t`` itself when the shapes are equal; a view when every dimension only shrinks; else a new tensor.
        Always of shape ``shape`` and of ``t``'s dtype and device; linear in ``t``.

    Raises:
        ValueError: If the number of dimensions differs.

    Example:
        >>> adapt(torch.arange(4.0), (2,))
        tensor([0., 1.])
        >>> adapt(torch.ones(1, 1), (3, 3), centre=(0, 1))
        tensor([[0., 0., 0.],
                [0., 1., 0.],
                [0., 0., 0.]])
    """
    target = tuple(int(s) for s in shape)
    if t.dim() != len(target):
        raise ValueError(f"cannot adapt a {t.dim()}-d tensor of shape {tuple(t.shape)} to {len(target)}-d {target}")
    if tuple(t.shape) == target:
        return t
    centred = {d % len(target) for d in centre} if target else set()
    # per dimension: left offset of the source in the target (negative = crop), and the right remainder
    lefts = [offset(s, m, d in centred) for d, (s, m) in enumerate(zip(t.shape, target))]
    rights = [(m - s) - left for s, m, left in zip(t.shape, target, lefts)]
    if all(left <= 0 and right <= 0 for left, right in zip(lefts, rights)):
        out = t  # crop only: a view, nothing allocated
        for d, (left, m) in enumerate(zip(lefts, target)):
            out = out.narrow(d, -left, m)
        return out
    # F.pad takes (left, right) pairs from the last dimension backwards; negative values crop.
    pads: list[int] = []
    for left, right in zip(reversed(lefts), reversed(rights)):
        pads += [left, right]
    # shape: t: S -> target T
    return F.pad(t, pads, mode="constant", value=0.0)


@dataclass(frozen=True)
class ShapeAdapter:
    """How one neighbour's tensor is mapped to the replaced block's shape.

    Attributes:
        source: The neighbour tensor's shape, or ``None`` if the neighbour has no usable counterpart (then
            the side contributes zeros).
        target: The replaced block's shape.
        centre: Dimensions aligned at their centres (see :func:`adapt`).

    Example:
        >>> ad = ShapeAdapter((8, 4, 5, 5), (4, 4, 3, 3), centre=(2, 3))
        >>> ad(torch.randn(8, 4, 5, 5)).shape
        torch.Size([4, 4, 3, 3])
        >>> ad.describe()
        'slice dim 0 8->4, crop dims 2,3 5->3 centred'
    """

    source: tuple[int, ...] | None
    target: tuple[int, ...]
    centre: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.target)
        object.__setattr__(self, "centre", tuple(sorted({d % n for d in self.centre})) if n else ())
        if self.source is not None and len(self.source) != n:
            raise ValueError(f"source {self.source} and target {self.target} differ in rank")

    @property
    def absent(self) -> bool:
        """Whether this side contributes zeros (no usable counterpart)."""
        return self.source is None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.source is None:
            raise ValueError("an absent side has no tensor to adapt; use adapt_pair()")
        return adapt(t, self.target, self.centre)

    def describe(self) -> str:
        """A short human-readable account, e.g. ``"zero-pad dim 0 64->128"`` or ``"absent: zeros"``."""
        if self.source is None:
            return "absent: zeros"
        groups: dict[tuple[str, int, int, bool], list[int]] = {}
        for d, (s, m) in enumerate(zip(self.source, self.target)):
            if s != m:
                verb = ("crop" if d in self.centre else "slice") if s > m else "zero-pad"
                groups.setdefault((verb, s, m, d in self.centre), []).append(d)
        parts = []
        for (verb, s, m, centred), dims in groups.items():
            label = "dim" if len(dims) == 1 else "dims"
            parts.append(f"{verb} {label} {','.join(map(str, dims))} {s}->{m}" + (" centred" if centred else ""))
        return ", ".join(parts) or "identity"


def adapt_pair(
    prev: torch.Tensor | None,
    next: torch.Tensor | None,
    prev_adapter: ShapeAdapter | None,
    next_adapter: ShapeAdapter | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map both neighbours' tensors to the target shape; an absent side becomes zeros.

    Args:
        prev: The previous block's tensor (``None`` if its side is absent).
        next: The next block's tensor (``None`` if its side is absent).
        prev_adapter: ``None`` when ``prev`` already has the target shape, else its adapter (possibly absent).
        next_adapter: Likewise for ``next``.

    Returns:
        Two tensors of the target shape, in the dtype and on the device of the present side(s).

    Raises:
        ValueError: If both sides are absent (such a tensor is not synthesized at all).

    Example:
        >>> adapt_pair(torch.ones(3), None, ShapeAdapter((3,), (2,)), ShapeAdapter(None, (2,)))
        (tensor([1., 1.]), tensor([0., 0.]))
    """
    p = _side(prev, prev_adapter)
    n = _side(next, next_adapter)
    if p is None and n is None:
        raise ValueError("both sides are absent: nothing to synthesize from")
    # shape: an absent side is zeros of the target shape, like the present side
    if p is None:
        p = n.new_zeros(n.shape)  # type: ignore[union-attr]
    if n is None:
        n = p.new_zeros(p.shape)
    return p, n


def _side(t: torch.Tensor | None, adapter: ShapeAdapter | None) -> torch.Tensor | None:
    if adapter is None:  # same shape: the tensor itself
        return t
    if adapter.absent or t is None:
        return None
    return adapter(t)
