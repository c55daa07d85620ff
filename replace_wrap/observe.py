"""Watching a converted model while it trains: the scalars' values and the trainable-parameter count.

Both are cheap enough to call every step: :func:`scalars` reads every replaced block's ``(a, b)`` with one
device-to-host copy and builds no report; :func:`print_trainable_parameters` counts parameters once each (tied
weights are one parameter).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .errors import NotConvertedError
from .surgery.apply import site_tensors, sites

__all__ = ["print_trainable_parameters", "scalar_logs", "scalars"]

Value = Union[float, tuple[float, ...]]


def scalars(model: nn.Module) -> dict[str, tuple[Value, Value]]:
    """``{block path: (a, b)}``: the current mix of every replaced block of ``model``.

    Paths are those of ``model.named_modules()`` of the model you pass (a wrapper such as a ``PeftModel`` or a
    ``LightningModule`` included). ``a`` and ``b`` are floats with ``scalars="block"``; with
    ``scalars="tensor"`` each is a tuple with one value per synthesized tensor, in
    ``block.replacement.tensor_names`` order. Rules that parametrize the mix differently (``convex``) report the
    ``(a, b)`` they stand for.

    Raises:
        NotConvertedError: If ``model`` has no replaced blocks.

    Example:
        >>> import torch, replace_wrap
        >>> net = replace_wrap.convert(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)]))
        >>> replace_wrap.scalars(net)
        {'1': (0.5, 0.5), '3': (0.5, 0.5)}
    """
    found = [(path, site) for path, _, site in sites(model)]
    if not found:
        raise NotConvertedError(
            f"{type(model).__name__} has no replaced blocks: convert it first with replace_wrap.convert(model)"
        )
    with torch.no_grad():
        parts = []
        for _, site in found:
            for t in site.coefficients():
                t = t.full_tensor() if hasattr(t, "full_tensor") else t  # a sharded (FSDP2) scalar
                parts.append(t.detach().float().reshape(-1).to("cpu", non_blocking=True))
        flat = torch.cat(parts).tolist()  # one synchronisation for the whole model
    out: dict[str, tuple[Value, Value]] = {}
    i = 0
    for path, site in found:
        n = site.n_sets
        a, b = flat[i : i + n], flat[i + n : i + 2 * n]
        i += 2 * n
        out[path] = (a[0], b[0]) if n == 1 else (tuple(a), tuple(b))
    return out


def print_trainable_parameters(model: nn.Module) -> None:
    """Print one line: trainable and total parameters, and what the replacement synthesizes.

    Like PEFT's ``print_trainable_parameters``; works on any model, converted or not, wrapped or not. Each
    parameter is counted once (tied weights share one), and a converted model's synthesized tensors are no
    parameters: the line adds how many replaced blocks there are and how many values they synthesize.

    Example:
        >>> import torch, replace_wrap
        >>> net = replace_wrap.convert(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)]))
        >>> replace_wrap.print_trainable_parameters(net)
        trainable params: 64 || all params: 64 || trainable%: 100.0000 || replaced blocks: 2 (4 scalars, 40 values synthesized)
    """
    trainable = total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    found = list(sites(model))
    if found:
        n_scalars = sum(p.numel() for _, _, s in found for p in s.parameters())
        with torch.no_grad():  # shapes only; computed once, like a state_dict
            synthesized = sum(getattr(layer, name).numel() for _, b, s in found for layer, name in site_tensors(b, s))
        line += f" || replaced blocks: {len(found)} ({n_scalars:,} scalars, {synthesized:,} values synthesized)"
    print(line)


def scalar_logs(model: nn.Module, prefix: str = "replace_wrap") -> dict[str, float]:
    """:func:`scalars` flattened for a metrics logger: ``{"<prefix>/<path>/a": 0.5, ...}``.

    With ``scalars="tensor"`` the keys end in ``a/<i>``, ``b/<i>`` (``i`` the tensor's position in
    ``block.replacement.tensor_names``). What the Trainer and Lightning callbacks log.
    """
    out: dict[str, float] = {}
    for path, (a, b) in scalars(model).items():
        for name, value in (("a", a), ("b", b)):
            if isinstance(value, tuple):
                out.update({f"{prefix}/{path}/{name}/{i}": v for i, v in enumerate(value)})
            else:
                out[f"{prefix}/{path}/{name}"] = value
    return out
