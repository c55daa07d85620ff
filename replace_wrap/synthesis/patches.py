"""Sampled output positions of a convolution: the input patches they read, and the layer's product on them.

A convolution's scalar gradient ``dL/da = sum over (item, position) of <dy[item, :, position], patch @ W_prev^T>``
is a sum over output positions of every batch item, like a linear layer's sum over rows. Sampling positions
(rather than whole batch items) keeps the sample spread over the batch. Only the sampled patches are gathered,
``(m, C * prod(kernel))``, straight from the input by index arithmetic: no unfold (``im2col``) of the whole
input and no padded copy of it; positions in the zero padding read zeros.

Any number of spatial dimensions, stride, zero padding, dilation and groups (depthwise included).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Positions", "gather_at", "gather_patches", "grouped_product", "locate"]

Positions = tuple[torch.Tensor, tuple[torch.Tensor, ...]]  # (batch item, per-dimension output coordinate)


def locate(units: torch.Tensor, out_spatial: tuple[int, ...]) -> Positions:
    """Batch item and output coordinates of flat unit indices into ``(batch, *out_spatial)``."""
    coords = []
    rest = units
    for size in reversed(out_spatial):  # the torch functions, not the operators' Python wrappers
        coords.append(torch.remainder(rest, size))
        rest = torch.div(rest, size, rounding_mode="floor")
    return rest, tuple(reversed(coords))


def gather_at(t: torch.Tensor, where: Positions) -> torch.Tensor:
    """``t[item, :, *coords]`` for every sampled position: ``(batch, C, *spatial) -> (m, C)``."""
    n, coords = where
    return t[(n, slice(None), *coords)]  # advanced indices around one slice: the indexed dim goes first


def gather_patches(
    x: torch.Tensor, where: Positions, kernel: tuple[int, ...], stride: tuple[int, ...],
    padding: tuple[int, ...], dilation: tuple[int, ...],
) -> torch.Tensor:
    """The input patch each sampled output position reads: ``(m, C * prod(kernel))``, channel-major.

    The layout is the weight's ``(C_in, *kernel)`` flattened, so ``patch @ W.reshape(out, -1).T`` is the
    convolution's output at that position (per group: see :func:`grouped_product`).
    """
    n, coords = where
    dims = len(kernel)
    if all(k == 1 for k in kernel) and not any(padding):  # a 1x1 kernel reads one position: half the time
        return gather_at(x, (n, tuple(c * s for c, s in zip(coords, stride))))  # shape: (m, C)
    # kernel offsets of every patch element, per dimension: shape (K,) each, K = prod(kernel)
    grid = torch.meshgrid(*[torch.arange(k, device=x.device) for k in kernel], indexing="ij")
    index, valid = [], None
    for d in range(dims):
        # shape: (m, 1) * s + (1, K) * dilation -> (m, K): the input coordinate each patch element reads
        i = coords[d][:, None] * stride[d] - padding[d] + grid[d].reshape(1, -1) * dilation[d]
        inside = (i >= 0) & (i < x.shape[2 + d])
        valid = inside if valid is None else valid & inside
        index.append(i.clamp(0, x.shape[2 + d] - 1))
    # shape: x (N, C, *S) indexed by (m, 1) items and (m, K) coordinates -> (m, K, C)
    patches = x[(n[:, None], slice(None), *index)]
    if any(p > 0 for p in padding):
        patches.mul_(valid[:, :, None])  # the zero padding
    return patches.transpose(1, 2).reshape(n.shape[0], -1)  # shape: (m, C, K) -> (m, C * K)


def grouped_product(groups: int):  # noqa: ANN201 - returns an estimators.Product
    """``product(patches, w)``: the convolution with weight ``w`` at the sampled positions, ``(m, out)``."""

    def product(xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = w.shape[0]
        if groups == 1:
            return xs @ w.reshape(out, -1).t()  # shape: (m, C*K) @ (C*K, out) -> (m, out)
        per = math.prod(w.shape[1:])  # C/groups * K
        # shape: (m, g, C/g*K) x (g, out/g, C/g*K) -> (m, g, out/g) -> (m, out), output channels group-major
        return torch.einsum("mgk,gok->mgo", xs.reshape(-1, groups, per), w.reshape(groups, out // groups, per)).reshape(
            xs.shape[0], out
        )

    return product
