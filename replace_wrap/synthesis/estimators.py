"""The scalar-gradient estimators of the layer kernels: exact and sampled ``dL/da``, ``dL/db``, and their helpers.

Pure tensor functions, shared by the linear and convolution kernels (:mod:`replace_wrap.synthesis.kernels`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .maths import mix

__all__ = [
    "ROW_PRODUCT_MAX",
    "ab_from_dw",
    "ab_from_one_product",
    "autocast_dtype",
    "bias_sources",
    "check_sample",
    "mix_bias",
    "mix_weight",
    "needs_graph",
    "reusable",
    "sample_rows",
    "scalar_grads",
    "scalars_on_host",
]

# Up to this many rows the scalar gradients are two thin products (2 * rows * in * out multiply-adds, reading
# each neighbour weight once); above it one dW = dy^T x (rows * in * out) plus two weight-sized dot products
# is cheaper. The crossover is about (matmul flop/s) / (memory bytes/s) * 8; measured near 40-100 on CPUs and
# higher on GPUs, so 64 is a middle that is never far off.
ROW_PRODUCT_MAX = 64


def check_sample(sample: object) -> float | None:
    """Validate a sampling fraction: ``None`` (exact) or a number in ``(0, 1]``; ``1`` means exact."""
    if sample is None:
        return None
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not (0.0 < float(sample) <= 1.0):
        raise ValueError(f"sample must be None (exact) or a fraction in (0, 1], got {sample!r}")
    return None if float(sample) == 1.0 else float(sample)


def sample_rows(n: int, sample: float | None, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """Indices of ``m = ceil(n * sample)`` distinct rows drawn uniformly, and the rescale ``n / m``.

    Drawn without replacement from the default generator of ``device`` (so ``torch.manual_seed`` makes it
    reproducible and checkpointing replays it). Each row is in the sample with probability ``m / n``, so
    ``n / m * sum(sampled terms)`` is an unbiased estimate of the sum over all rows. ``None`` when every row
    is used.
    """
    if sample is None:
        return None, 1.0
    m = max(1, math.ceil(n * sample))
    if m >= n:
        return None, 1.0
    return torch.randperm(n, device=device)[:m], n / m


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    kind = x.device.type
    if kind == "meta":  # autocast has no meta dispatch key (and asking raises): nothing is computed anyway
        return None
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ab_from_dw(dw: torch.Tensor, prev: torch.Tensor, next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # <dW, W_prev> as one fused reduction: no product tensor of the weight's size is allocated.
    dw, prev, next = dw.reshape(-1), prev.reshape(-1), next.reshape(-1)
    if dw.dtype != prev.dtype:  # autocast: dW in the compute dtype, neighbours in the weights' dtype
        dw = dw.to(prev.dtype)
    return torch.dot(dw, prev), torch.dot(dw, next)


def scalars_on_host(t: torch.Tensor) -> bool:
    # Reading a CPU scalar costs nothing; on an accelerator it would wait for the device (a sync per layer).
    return t.device.type == "cpu"


def ab_from_one_product(
    d: torch.Tensor, xs: torch.Tensor, xw: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    prev: torch.Tensor, next: torch.Tensor, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-row sums ``G_a = <d, xs @ prev^T + bias_prev>``, ``G_b = <d, xs @ next^T + bias_next>`` for the
    price of one thin product (the bias terms only when the bias is mixed with the same ``a, b``).

    The forward already gives ``xw = xs @ W^T (+ the mixed bias)``, so ``g_s = <d, xw> = a * G_a + b * G_b``
    comes free and one product gives the other equation. Both sums are linear in the sampled rows, so the
    estimate stays unbiased.

    - Scalars on the CPU (readable for free): the product is taken with the neighbour of the *smaller*
      coefficient, and the other sum solved from ``g_s`` by dividing by the larger one, which loses no
      precision (the error stays below machine epsilon times the gradients' size). At ``a = b = 0`` (``W = 0``,
      ``g_s`` carries nothing) both products are taken.
    - Scalars on an accelerator (reading them would synchronize): one product with ``W_c = -b * prev + a * next``
      gives ``g_c = -b * G_a + a * G_b``; the 2x2 system is a rotation scaled by ``a^2 + b^2`` (condition
      number 1). At ``a = b = 0`` the product is taken with ``prev``: ``G_a`` is exact there and ``G_b``
      reads 0 for that step.
    """
    dt = prev.dtype
    xs, d, xw = xs.to(dt), d.to(dt), xw.to(dt)
    d1 = d.reshape(-1)
    dsum = d.sum(0) if bias_prev is not None else None  # shape: (m, out) -> (out,)

    def side(w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # shape: (m, in) @ (in, out) -> (m, out), reduced against d (m, out)
        g = torch.dot((xs @ w.t()).reshape(-1), d1)
        return g if dsum is None or bias is None else g + torch.dot(dsum, bias.to(dt))

    g_s = torch.dot(xw.reshape(-1), d1)
    if scalars_on_host(a):
        av, bv = float(a), float(b)
        if av == 0.0 and bv == 0.0:
            return side(prev, bias_prev), side(next, bias_next)
        if abs(av) >= abs(bv):
            g_b = side(next, bias_next)
            return (g_s - bv * g_b) / av, g_b
        g_a = side(prev, bias_prev)
        return g_a, (g_s - av * g_a) / bv
    a, b = a.to(dt), b.to(dt)
    det = a * a + b * b
    degenerate = det == 0
    c1 = torch.where(degenerate, torch.ones_like(b), -b)
    g_c = side(mix(c1, a, prev, next), None if bias_prev is None else mix(c1, a, bias_prev, bias_next))
    safe = torch.where(degenerate, torch.ones_like(det), det)
    g_a = torch.where(degenerate, g_c, (a * g_s - b * g_c) / safe)
    g_b = torch.where(degenerate, torch.zeros_like(g_c), (b * g_s + a * g_c) / safe)
    return g_a, g_b


def scalar_grads(
    ctx: Any, ga: torch.Tensor | None, gb: torch.Tensor | None, db: torch.Tensor | None,
    bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dL/da, dL/db in the scalars' dtype and shape: the rescaled sampled part plus the exact bias part."""
    need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    out = []
    for need, g, bias_src, like in ((need_a, ga, bias_prev, a), (need_b, gb, bias_next, b)):
        if not need:
            out.append(None)
            continue
        if g is None:
            total = torch.zeros((), dtype=torch.float32, device=like.device)
        else:
            total = g.float() if ctx.scale == 1.0 else g.float() * ctx.scale
        if db is not None and bias_src is not None:
            total = total + torch.dot(db.to(bias_src.dtype), bias_src).float()
        out.append(total.to(like.dtype).reshape(like.shape))
    return out[0], out[1]


def mix_weight(
    a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    if out is None:
        return mix(a, b, prev, next)
    # the same two passes as fusion.mix, into the caller's buffer: bitwise the same weight
    torch.mul(prev, a.to(prev.dtype), out=out)
    return out.addcmul_(next, b.to(prev.dtype))


def reusable(buffer: torch.Tensor | None) -> bool:
    """Whether ``buffer`` (held by exactly one Python reference, the caller's) is referenced by no live graph.

    A tensor saved for the backward is held by the graph until the backward has run (or the graph is
    dropped); ``Tensor._use_count`` counts those holders. Where that private counter does not exist the
    answer is ``False``, and callers allocate afresh.
    """
    count = getattr(buffer, "_use_count", None)
    return buffer is not None and count is not None and count() == 1


def bias_sources(
    bias: torch.Tensor | None, bias_mix: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(bias_prev, bias_next)`` of a mixed bias, ``(None, None)`` without one; an own bias excludes it."""
    if bias_mix is not None and bias is not None:
        raise ValueError("pass either bias or bias_mix, not both")
    return bias_mix if bias_mix is not None else (None, None)


def mix_bias(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, bias_prev: torch.Tensor | None,
    bias_next: torch.Tensor | None,
) -> torch.Tensor | None:
    return mix(a, b, bias_prev, bias_next) if bias_prev is not None else bias
