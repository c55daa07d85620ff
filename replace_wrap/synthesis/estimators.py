"""The scalar-gradient estimators of the layer kernels: exact and sampled ``dL/da``, ``dL/db``, and their helpers.

Pure tensor functions, shared by the linear and convolution kernels (:mod:`replace_wrap.synthesis.kernels`).

**Units.** A layer's scalar gradients are sums over *units*: ``dL/da = sum_i g_i`` with
``g_i = <dy_i, x_i W_prev^T>`` for unit ``i``. A unit is a row of a linear layer's input (a token, all leading
dimensions flattened) and an output position of a convolution (a batch item times a spatial position, whose
input is the patch the kernel reads there).

**The sampling rule** (``sample="auto"``, the default of :class:`~replace_wrap.ReplaceConfig`): of ``N`` units,
``m = max(AUTO_MIN_UNITS, ceil(N * AUTO_FRACTION))`` are drawn uniformly without replacement each step, and
``N / m * (sum over the sample)`` estimates the sum; when ``m >= N`` every unit is used and the gradient is exact.
The estimator is unbiased, and its variance is the textbook one for sampling without replacement,

    ``Var = N^2 * (1/m - 1/N) * S^2``,  ``S^2`` the variance of the ``g_i`` over the ``N`` units,

so, with ``cv = S / |mean g_i|`` (how much the units disagree), the relative standard error is at most
``cv / sqrt(AUTO_MIN_UNITS)`` (= cv / 4), and the variance it adds to the exact minibatch sum is at most
``1 / AUTO_FRACTION - 1`` (= 63) times the sum's own unit-to-unit variance ``N * S^2``. A fraction ``f`` in
``(0, 1)`` instead of ``"auto"`` draws ``m = ceil(N * f)`` units (the 0.1/0.2 meaning, no minimum).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .maths import mix

__all__ = [
    "AUTO",
    "AUTO_FRACTION",
    "AUTO_MIN_UNITS",
    "ROW_PRODUCT_MAX",
    "ab_from_dw",
    "ab_from_one_product",
    "autocast_dtype",
    "bias_sources",
    "check_sample",
    "describe_sample",
    "mix_bias",
    "needs_graph",
    "requires_grad",
    "sample_size",
    "sample_units",
    "scalar_grads",
    "scalars_on_host",
    "transposed",
]

AUTO = "auto"
# M and f of the rule. M bounds the relative standard error (cv / sqrt(M)); f bounds the added variance
# (1/f - 1 times the unit-to-unit variance) on large layers. The estimate costs one thin product of m units,
# m/(2N) of a frozen layer's forward and input gradient: 0.8% on large layers (f = 1/64; 1/32 measured about
# 0.6% of a ViT-S step more), and M = 16 keeps it at 3% of a layer of only 272 units (HF ViT-B at 64 px, batch
# 16), where M = 32 would double it (docs/benchmarks.md).
AUTO_MIN_UNITS = 16
AUTO_FRACTION = 1 / 64

# Up to this many units the exact scalar gradients come from one thin product and the output (which the
# forward computed); above it one dW = dy^T x (the same multiply-adds) keeps less memory: only x is saved.
ROW_PRODUCT_MAX = 64


def check_sample(sample: object) -> float | str | None:
    """Validate a sampling setting: ``None`` (exact), ``"auto"``, or a fraction in ``(0, 1]`` (``1`` is exact)."""
    if sample is None or sample == AUTO:
        return sample  # type: ignore[return-value]
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not (0.0 < float(sample) <= 1.0):
        raise ValueError(f"sample must be None (exact), 'auto' or a fraction in (0, 1], got {sample!r}")
    return None if float(sample) == 1.0 else float(sample)


def sample_size(n: int, sample: float | str | None) -> int:
    """How many of ``n`` units the estimator reads: ``n`` means the exact gradient (see the module docstring)."""
    if sample is None:
        return n
    if sample == AUTO:
        m = max(AUTO_MIN_UNITS, (n + round(1 / AUTO_FRACTION) - 1) // round(1 / AUTO_FRACTION))
    else:
        m = max(1, math.ceil(n * float(sample)))
    return min(m, n)


def describe_sample(sample: float | str | None) -> str:
    """The estimator in words, for reports: ``exact``, or how many units are sampled."""
    if sample is None:
        return "exact"
    if sample == AUTO:
        return f"sampled: m = max({AUTO_MIN_UNITS}, N/{round(1 / AUTO_FRACTION)}) of N units, exact when m >= N"
    return f"sampled: m = ceil({sample:g} N) of N units"


def sample_units(n: int, sample: float | str | None, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """Indices of ``m = sample_size(n, sample)`` distinct units drawn uniformly, and the rescale ``n / m``.

    Drawn without replacement from the default generator of ``device`` (so ``torch.manual_seed`` makes it
    reproducible and checkpointing replays it). Each unit is in the sample with probability ``m / n``, so
    ``n / m * sum(sampled terms)`` is an unbiased estimate of the sum over all units. ``None`` when every
    unit is used.
    """
    m = sample_size(n, sample)
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
    return torch.is_grad_enabled() and any(requires_grad(*tensors))


def requires_grad(*tensors: torch.Tensor | None) -> list[bool]:
    """Which of ``tensors`` require grad (``False`` for ``None``): a Function's ``needs_input_grad``, before it runs."""
    return [t is not None and t.requires_grad for t in tensors]


def transposed(t: torch.Tensor) -> bool:
    """A 2-d tensor stored as its transpose, e.g. HF ``Conv1D``'s ``(in, out)`` weight seen as ``(out, in)``."""
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``<u, v>`` over all elements of two tensors of one shape; no copy when both share a dense layout."""
    if transposed(u) and transposed(v):
        return torch.dot(u.t().reshape(-1), v.t().reshape(-1))
    return torch.dot(u.reshape(-1), v.reshape(-1))


def ab_from_dw(dw: torch.Tensor, prev: torch.Tensor, next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``<dW, W_prev>``, ``<dW, W_next>`` as fused reductions (no product tensor of the weight's size)."""
    if dw.dtype != prev.dtype:  # autocast: dW in the compute dtype, neighbours in the weights' dtype
        dw = dw.to(prev.dtype)
    return _dot(dw, prev), _dot(dw, next)


def scalars_on_host(t: torch.Tensor) -> bool:
    # Reading a CPU scalar costs nothing; on an accelerator it would wait for the device (a sync per layer), and
    # under torch.compile it would break the graph.
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


Product = Callable[..., torch.Tensor]  # product(xs, w, bias=None) -> the layer's output at the units


def linear_product(xs: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # shape: (m, in) @ (in, out) (+ (out,)) -> (m, out); the bias added inside the product (addmm)
    return xs @ w.t() if bias is None else torch.addmm(bias, xs, w.t())


def ab_from_one_product(
    d: torch.Tensor, xs: torch.Tensor, xw: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    prev: torch.Tensor, next: torch.Tensor, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
    host: bool, product: Product = linear_product, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` times the unit sums ``G_a = <d, xs (*) prev + bias_prev>``, ``G_b = <d, xs (*) next + bias_next>``
    for the price of one thin product where the scalars can be read (the bias terms only when the bias is mixed
    with the same ``a, b``).

    ``product(xs, w, bias)`` is the layer's map of the units' inputs ``xs`` with weight ``w`` (``xs @ w^T`` for a
    linear layer, a grouped product of patches for a convolution), plus ``bias``, and ``d`` the output gradient
    at the units, of the product's shape. The forward already gives ``xw = product(xs, W) (+ the mixed bias)``,
    so ``g_s = <d, xw> = a * G_a + b * G_b`` comes free and one product gives the other equation. Both sums are
    linear in the units, so a sampled estimate (``scale = N / m``) stays unbiased.

    - ``host=True`` (scalars on the CPU, readable for free): the product is taken with the neighbour of the
      *smaller* coefficient, and the other sum solved from ``g_s`` by dividing by the larger one, which loses
      no precision (the error stays below machine epsilon times the gradients' size). At ``a = b = 0``
      (``W = 0``, ``g_s`` carries nothing) both products are taken.
    - ``host=False`` (an accelerator, or torch.compile's shape functions: reading the scalars would synchronize
      or break the graph): both products are taken, each sum directly. A second thin product costs an
      accelerator next to nothing; a solve without reading the scalars (a product with the synthesized
      ``-b * W_prev + a * W_next`` and a rotation, as before) took a weight-sized synthesis and some twenty
      small operations, each a kernel launch, and special-cased ``a = b = 0``.

    Every step is one operation where it can be (the bias inside the product, the solve and the rescale as one
    fused add and one multiply): on small layers the number of operations, not their arithmetic, is the cost.
    Both routes give the same unit sums up to rounding, so the estimate and its variance are the same.
    """
    dt = prev.dtype
    if xs.dtype != dt:  # autocast: the units were kept in the compute dtype
        xs, d, xw = xs.to(dt), d.to(dt), xw.to(dt)
    d1 = d.reshape(-1)

    def side(w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None and bias.dtype != dt:
            bias = bias.to(dt)
        return _wide(torch.dot(product(xs, w, bias).reshape(-1), d1))

    av, bv = (float(a), float(b)) if host else (0.0, 0.0)
    if av == 0.0 and bv == 0.0:  # an accelerator, or W = 0: both sums, each from its own product
        return _scaled(side(prev, bias_prev), scale), _scaled(side(next, bias_next), scale)
    # The sums come in the weights' dtype; the solve and the rescale N/m run in at least fp32 (a half-precision
    # sum times N/m could overflow where the sum does not).
    g_s = _wide(torch.dot(xw.reshape(-1), d1))
    if abs(av) >= abs(bv):
        g_b = side(next, bias_next)
        return _solve(g_s, g_b, bv, av, scale), _scaled(g_b, scale)
    g_a = side(prev, bias_prev)
    return _scaled(g_a, scale), _solve(g_s, g_a, av, bv, scale)


def _wide(g: torch.Tensor) -> torch.Tensor:
    """``g`` in at least fp32 (fp64 stays fp64)."""
    return g.float() if g.dtype in (torch.float16, torch.bfloat16) else g


def _solve(g_s: torch.Tensor, g_o: torch.Tensor, o: float, c: float, scale: float) -> torch.Tensor:
    """``(g_s - o * g_o) * scale / c``: the unknown sum of ``g_s = c * G + o * G_o``, rescaled, in two operations
    (three when ``scale / c`` itself overflows the dtype: ``c`` subnormal)."""
    out = torch.add(g_s, g_o, alpha=-o)
    factor = scale / c
    if abs(factor) <= torch.finfo(out.dtype).max:
        return out.mul_(factor)
    return out.div_(c).mul_(scale)


def _scaled(g: torch.Tensor, scale: float) -> torch.Tensor:
    return g if scale == 1.0 else g * scale


def scalar_grads(
    need: tuple[bool, bool], ga: torch.Tensor | None, gb: torch.Tensor | None,
    db: torch.Tensor | None, bias_prev: torch.Tensor | None, bias_next: torch.Tensor | None,
    a: torch.Tensor, b: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dL/da, dL/db in the scalars' dtype and shape: the unit sums (already rescaled) plus the exact bias part.

    ``db`` (the full bias gradient) is given when the mixed bias's share is not yet in the sums.
    """
    out: list[torch.Tensor | None] = []
    for wanted, g, bias_src, like in ((need[0], ga, bias_prev, a), (need[1], gb, bias_next, b)):
        if not wanted:
            out.append(None)
            continue
        if g is None:
            total = torch.zeros((), dtype=torch.float32, device=like.device)
        else:
            total = g if g.dtype == torch.float32 else g.float()
        if db is not None and bias_src is not None:
            total = total + torch.dot(db if db.dtype == bias_src.dtype else db.to(bias_src.dtype), bias_src).float()
        if total.dtype != like.dtype:
            total = total.to(like.dtype)
        out.append(total if total.shape == like.shape else total.view(like.shape))
    return out[0], out[1]


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
