"""Attachments: what rides along a converted model besides its rewritten blocks, and leaves with ``merge``.

A conversion changes more than the blocks: the model keeps its report, refuses state dicts that do not fit
(the state-dict guard), writes its replaced tensors' values into its state dicts (plain-loadable
checkpoints), a Hugging Face model records the conversion in its config so that ``save_pretrained`` carries
it, and a PEFT wrapper that would lose the trained function is refused. Each such concern is an
*attachment*, registered by the stage that owns it (the guard, the state-dict values and the config record
belong to :mod:`replace_wrap.io`, the PEFT guard to :mod:`replace_wrap.integrations.peft`) and applied by
``convert`` in registration order; an attachment that raises undoes the whole conversion. The registry keeps the pipeline acyclic: the core calls attachments without importing
the stages that define them.

An attachment is a pair of functions: ``attach(model, report)`` and ``detach(model)``. ``detach`` works on
whatever model it is given (a deep copy of a converted model detaches its own hooks, not the original's) and
does nothing where nothing is attached; ``convert`` calls it when a later step fails, ``merge``/``revert``
when the model becomes plain again.

Example:
    >>> from replace_wrap.surgery.attachments import list_attachments
    >>> list_attachments()[0]
    'report'
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import nn

from ..errors import RegistryError
from ..report import REPORT_ATTR

__all__ = ["Attachment", "attach_all", "detach_all", "list_attachments", "register_attachment"]


class Attachment(NamedTuple):
    name: str
    attach: Callable[[nn.Module, Any], None]
    detach: Callable[[nn.Module], None]


_ATTACHMENTS: dict[str, Attachment] = {}  # insertion order is attach order


def register_attachment(
    name: str, detach: Callable[[nn.Module], None]
) -> Callable[[Callable[[nn.Module, Any], None]], Callable[[nn.Module, Any], None]]:
    """Decorator registering ``attach(model, report)`` (with its ``detach(model)``) for every converted model.

    Raises:
        RegistryError: If ``name`` is taken by other functions.
    """

    def decorator(attach: Callable[[nn.Module, Any], None]) -> Callable[[nn.Module, Any], None]:
        if not (callable(attach) and callable(detach)):
            raise RegistryError(f"@register_attachment({name!r}) needs callables attach(model, report), detach(model)")
        known = _ATTACHMENTS.get(name)
        if known is not None and known.attach.__qualname__ != getattr(attach, "__qualname__", None):
            raise RegistryError(f"an attachment named {name!r} is already registered; choose another name")
        _ATTACHMENTS[name] = Attachment(name, attach, detach)
        return attach

    return decorator


def list_attachments() -> list[str]:
    """Names of the registered attachments, in the order ``convert`` applies them."""
    return list(_ATTACHMENTS)


def attach_all(model: nn.Module, report: Any) -> None:
    """Apply every attachment to ``model``; if one fails, those already applied are detached again."""
    done: list[Attachment] = []
    try:
        for a in _ATTACHMENTS.values():
            a.attach(model, report)
            done.append(a)
    except BaseException:
        for a in reversed(done):
            a.detach(model)
        raise


def detach_all(model: nn.Module) -> None:
    """Remove every attachment from ``model`` (and from the converted module it wraps), in reverse order."""
    holders = [model] + [m for m in model.modules() if m is not model and REPORT_ATTR in m.__dict__]
    for holder in holders:
        for a in reversed(list(_ATTACHMENTS.values())):
            a.detach(holder)


def _forget_report(model: nn.Module) -> None:
    model.__dict__.pop(REPORT_ATTR, None)


@register_attachment("report", detach=_forget_report)
def _keep_report(model: nn.Module, report: Any) -> None:
    # First in order: later attachments may read the report.
    object.__setattr__(model, REPORT_ATTR, report)
