"""Plain-loadable checkpoints: a converted model's state dict also holds its replaced tensors' synthesized values.

A converted model's own state dict has no tensors for its replaced blocks (they are synthesized) and holds
the scalars instead, so a checkpoint of it loaded by a plain loader (Hugging Face ``from_pretrained``, an HF
``pipeline``, ``load_state_dict`` into an unconverted model) would re-initialise those blocks and predict
differently. So ``convert`` registers a ``state_dict`` post-hook on every replaced block (the
``plain_state_dict`` attachment, removed by ``merge``): each state dict then *also* holds every replaced
tensor's current synthesized value, detached and computed under ``torch.no_grad()`` and
:func:`~replace_wrap.synthesis.rules.state_frozen` (a stateful rule's state is not updated), under the key the tensor had before ``convert``. Every checkpoint of a converted model is then

- a valid **plain** checkpoint of the original architecture, plus the scalar keys
  (``<block>.replacement.a``, ...), which plain loaders report as unexpected and drop: the plain model computes
  exactly what the converted one computed when it was saved;
- still a **converted** checkpoint: loading it into a model converted the same way (``replace_wrap.load``,
  ``replace_wrap.from_pretrained``, a Trainer resume, ``model.load_state_dict``) restores the scalars exactly;
  the synthesized values are derived data (the scalars and the neighbours define them) and the state-dict
  guard drops them (:mod:`replace_wrap.io.guard`).

Cost: the checkpoint holds the replaced blocks' tensors again, so it is about the size of the original model's
(plus two fp32 scalars per replaced block) instead of the smaller converted-only one; see docs/training.md for
measured ratios. ``ReplaceConfig(plain_state_dict=False)`` keeps the converted-only state dict.

Sharded models: when a replaced block's scalars are ``DTensor`` s (FSDP2 ``fully_shard``), the hook writes
nothing for that block: a sharded state dict (``torch.distributed.checkpoint``) stays converted-only, and loads
into a model converted and sharded the same way.

Example:
    >>> import torch, replace_wrap
    >>> def make():
    ...     return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])
    >>> net = replace_wrap.convert(make(), every=2)
    >>> plain = make()
    >>> _ = plain.load_state_dict(net.state_dict(), strict=False)  # drops the scalars, loads everything else
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(plain(x), net(x))
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..analysis.wrappers import key_path
from ..report import ConversionReport
from ..surgery.apply import located_tensors, sites
from ..surgery.attachments import register_attachment
from ..surgery.site import SITE_ATTR, ReplacementSite
from ..synthesis.mixing import SOURCES_ATTR
from ..synthesis.rules import state_frozen

__all__ = ["converted_only", "synthesized_keys", "synthesized_paths"]

_OFF: ContextVar[bool] = ContextVar("replace_wrap_plain_state_dict_off", default=False)


@contextmanager
def converted_only() -> Iterator[None]:
    """Inside the ``with`` block, state dicts of converted models hold no synthesized values (the scalars only).

    ``replace_wrap.from_pretrained`` uses it while Hugging Face reads the converted model's expected keys.
    """
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def synthesized_keys(block: nn.Module) -> list[str]:
    """The state-dict keys (relative to ``block``) the hook writes for a replaced block; ``[]`` for others."""
    site = block._modules.get(SITE_ATTR)
    if not isinstance(site, ReplacementSite):
        return []
    return [key for key, _, _ in located_tensors(block, site)]


def synthesized_paths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The keys (relative to ``model``) under which its state dict holds the replaced tensors' synthesized values
    when the hook writes them, with their shapes (nothing is synthesized). Keys as torch writes them: a block in a
    ``checkpoint_wrapper`` has none of its path's ``_checkpoint_wrapped_module``."""
    return {
        f"{at}.{key}" if (at := key_path(model, path)) else key: layer.__dict__[SOURCES_ATTR][name].shape(name)
        for path, block, site in sites(model)
        for key, layer, name in located_tensors(block, site)
    }


def _write_synthesized(block: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    site = block._modules.get(SITE_ATTR)
    if _OFF.get() or not isinstance(site, ReplacementSite) or _sharded(site):
        return
    with torch.no_grad(), state_frozen():  # saving never moves a rule's state (ema in training mode)
        for key, layer, name in located_tensors(block, site):
            state_dict[prefix + key] = getattr(layer, name).detach()


def _sharded(site: nn.Module) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor  # late: only where a process group exists

    return any(isinstance(p, DTensor) for p in site.parameters())


def _remove_writer(model: nn.Module) -> None:
    for module in model.modules():
        hooks = module._state_dict_hooks
        for key in [k for k, h in hooks.items() if h is _write_synthesized]:
            del hooks[key]


@register_attachment("plain_state_dict", detach=_remove_writer)
def _install_writer(model: nn.Module, report: ConversionReport) -> None:
    if not report.config.plain_state_dict:
        return
    for b in report.replaced:
        model.get_submodule(b.path).register_state_dict_post_hook(_write_synthesized)
