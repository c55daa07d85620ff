"""Lazy, cached probes for optional libraries (timm, transformers); nothing heavy is imported eagerly."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable

from torch import nn

__all__ = ["has_timm", "has_transformers", "is_fx_symbolic_tracing", "timm_notrace"]


@functools.lru_cache(maxsize=None)
def _available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def has_timm() -> bool:
    return _available("timm")


def has_transformers() -> bool:
    return _available("transformers")


def timm_notrace(model: nn.Module) -> tuple[list[type[nn.Module]], list[Callable[..., Any]]]:
    """timm's FX leaf modules and autowrapped functions, if the model uses timm; else empty lists.

    Only consulted when a module of the model comes from timm, so converting a plain model never imports timm.
    """
    if not has_timm() or not any(type(m).__module__.startswith("timm.") for m in model.modules()):
        return [], []
    try:
        from timm.layers import _fx
    except Exception:  # an old or broken timm: trace without its registry
        return [], []
    modules = list(_fx.get_notrace_modules())
    functions = [f for f in _fx.get_notrace_functions() if callable(f)]
    return modules, functions


try:  # torch.fx keeps the flag in a private module; its function is the supported way to read it
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # pragma: no cover - a torch without it cannot trace into our layers either
    def _fx_tracing() -> bool:
        return False


def is_fx_symbolic_tracing() -> bool:
    """Whether ``torch.fx.symbolic_trace`` is tracing right now (not dynamo, not export)."""
    return _fx_tracing()
