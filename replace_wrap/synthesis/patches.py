"""Sampled output positions of a convolution: the input patches they read, and the layer's product on them.

A convolution's scalar gradient ``dL/da = sum over (item, position) of <dy[item, :, position], patch @ W_prev^T>``
is a sum over output positions of every batch item, like a linear layer's sum over rows. Sampling positions
(rather than whole batch items) keeps the sample spread over the batch. Only the sampled patches are gathered,
``(m, C * prod(kernel))``, straight from the input by one indexing operation: no unfold (``im2col``) of the whole
input and no padded copy of it; positions in the zero padding read zeros.

Where each patch element reads depends only on the layer's geometry, so on the CPU it is tabulated once per
geometry (an ``(output positions, kernel elements)`` table of flat input positions, cached) and a call only
looks the sampled positions up in it: a handful of operations per call rather than a few per spatial
dimension, which on small layers cost more than the gather itself. Geometries whose table would be large, and
tensors on accelerators (a cached device tensor would outlive CUDA graph captures and the streams that used
it), compute the reads for the sampled positions only, with the same formula.

Any number of spatial dimensions, stride, zero padding, dilation and groups (depthwise included).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = ["Positions", "gather_at", "gather_patches", "grouped_product", "locate"]

Positions = tuple[torch.Tensor, torch.Tensor]  # (batch item, flat output position) of each sampled unit

# Largest table cached (positions x kernel elements; int64 plus a bool mask: 9 bytes each, 2.25 MiB) and how
# many geometries are kept (least recently used first out): a model at one input size has a handful
# (ResNet-50: 7, well under 1 MiB each at 224 px), so the cache holds a few MiB, 36 MiB at most.
TABLE_MAX = 1 << 18
_TABLES = 16


def locate(units: torch.Tensor, out_spatial: Sequence[int]) -> Positions:
    """Batch item and flat output position (row-major over ``out_spatial``) of flat unit indices."""
    p = math.prod(out_spatial)
    return torch.div(units, p, rounding_mode="floor"), torch.remainder(units, p)


def gather_at(t: torch.Tensor, where: Positions) -> torch.Tensor:
    """``t[item, :, position]`` for every sampled position: ``(batch, C, *spatial) -> (m, C)``."""
    n, pos = where
    return _index(t, n, pos)


def _index(t: torch.Tensor, n: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``t[n, :, pos]`` with ``pos`` flat spatial positions (row-major), broadcast: shape ``(*pos.shape, C)``.

    One index over the spatial dimensions merged, a view for contiguous and channels-last tensors; a layout
    whose spatial dimensions do not merge (a cropped view) is indexed per dimension rather than copied.
    """
    try:
        flat = t.view(*t.shape[:2], -1)
    except RuntimeError:  # not mergeable without a copy of the whole tensor
        return t[(n, slice(None), *_coordinates(pos, t.shape[2:]))]
    return flat[n, :, pos]  # advanced indices around one slice: the indexed dims go first


def gather_patches(
    x: torch.Tensor, where: Positions, kernel: tuple[int, ...], stride: tuple[int, ...],
    padding: tuple[int, ...], dilation: tuple[int, ...], out_spatial: tuple[int, ...], cache: bool = True,
) -> torch.Tensor:
    """The input patch each sampled output position reads: ``(m, C * prod(kernel))``, channel-major.

    The layout is the weight's ``(C_in, *kernel)`` flattened, so ``patch @ W.reshape(out, -1).T`` is the
    convolution's output at that position (per group: see :func:`grouped_product`). ``cache=False`` (tensors
    being traced, whose tables must not outlive the trace) computes the reads without the table cache, as
    every tensor not on the CPU does.
    """
    n, pos = where
    in_spatial = tuple(x.shape[2:])
    if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding):
        return gather_at(x, where)  # a 1x1 kernel at stride 1 reads its own position: shape (m, C)
    geometry = (in_spatial, tuple(out_spatial), tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
    if cache and x.device.type == "cpu" and math.prod(out_spatial) * math.prod(kernel) <= TABLE_MAX:
        table, inside = _table(*geometry)
        flat = table.index_select(0, pos)
        valid = None if inside is None else inside.index_select(0, pos)
    else:
        flat, valid = _reads(_coordinates(pos, out_spatial), in_spatial, *geometry[2:])
    # shape: x (N, C, *S) indexed by (m, 1) items and (m, K) flat positions -> (m, K, C)
    patches = _index(x, n[:, None], flat)
    if valid is not None:
        patches.mul_(valid[:, :, None])  # the zero padding
    return patches.transpose(1, 2).reshape(n.shape[0], -1)  # shape: (m, C, K) -> (m, C * K)


def _coordinates(pos: torch.Tensor, spatial: Sequence[int]) -> list[torch.Tensor]:
    """Per-dimension coordinates of flat (row-major) positions in a grid of shape ``spatial``."""
    coords = []
    for size in reversed(spatial[1:]):
        coords.append(torch.remainder(pos, size))
        pos = torch.div(pos, size, rounding_mode="floor")
    coords.append(pos)
    return coords[::-1]


def _reads(
    coords: Sequence[torch.Tensor], in_spatial: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
    padding: tuple[int, ...], dilation: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For output positions given by per-dimension coordinates ``(M,)``: the flat input position each of the
    ``K = prod(kernel)`` patch elements reads, ``(M, K)`` (clamped into the input), and whether it lies inside
    the input (``None`` when every read does)."""
    device = coords[0].device
    offsets = torch.meshgrid(*[torch.arange(k, device=device) for k in kernel], indexing="ij")
    flat, valid = None, None
    for d, size in enumerate(in_spatial):
        # shape: (M, 1) * s + (1, K) * dilation -> (M, K): the input coordinate each patch element reads
        i = coords[d][:, None] * stride[d] - padding[d] + offsets[d].reshape(1, -1) * dilation[d]
        if padding[d] > 0:  # then the first position's first element reads the padding; without, all are inside
            inside = (i >= 0) & (i < size)
            valid = inside if valid is None else valid & inside
            i = i.clamp(0, size - 1)
        flat = i if flat is None else flat * size + i
    return flat, valid  # type: ignore[return-value]


@functools.lru_cache(maxsize=_TABLES)
def _table(
    in_spatial: tuple[int, ...], out_spatial: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
    padding: tuple[int, ...], dilation: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_reads` for every output position, ``(P, K)``: the table the sampled positions are looked up in
    (CPU tensors only, see the module docstring)."""
    pos = torch.arange(math.prod(out_spatial), device="cpu")
    return _reads(_coordinates(pos, out_spatial), in_spatial, kernel, stride, padding, dilation)


def grouped_product(groups: int):  # noqa: ANN201 - returns an estimators.Product
    """``product(patches, w, bias=None)``: the convolution with weight ``w`` (plus ``bias``) at the sampled
    positions, ``(m, out)``."""

    def product(xs: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = w.shape[0]
        if groups == 1:
            w2 = w.reshape(out, -1).t()  # shape: (m, C*K) @ (C*K, out) -> (m, out)
            return xs @ w2 if bias is None else torch.addmm(bias, xs, w2)
        per = math.prod(w.shape[1:])  # C/groups * K
        # shape: (m, g, C/g*K) x (g, out/g, C/g*K) -> (m, g, out/g) -> (m, out), output channels group-major
        y = torch.einsum("mgk,gok->mgo", xs.reshape(-1, groups, per), w.reshape(groups, out // groups, per)).reshape(
            xs.shape[0], out
        )
        return y if bias is None else y.add_(bias)

    return product
