"""What ``convert`` did and did not do, per block, with reasons; renders as a table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import ReplaceConfig

__all__ = [
    "REPORT_ATTR", "BlockReport", "ConversionReport", "LayerRoute", "converted_module", "converted_modules",
    "stored_report",
]

REPORT_ATTR = "_replace_wrap_report"  # where a converted model keeps its report (see surgery.attachments)


@dataclass
class LayerRoute:
    """How one layer of a replaced block computes: its forward path and its scalar-gradient estimator.

    Attributes:
        path: Path of the layer inside the block (``""`` for the block itself).
        layer: The layer's class name.
        tensors: Its synthesized tensors.
        route: ``"kernel 'NAME'"`` (a layer kernel computes it with the lean backward) or ``"generic"``
            (ordinary autograd through the synthesized tensors: a full weight gradient per step).
        estimator: ``dL/da, dL/db`` in words: ``exact ...`` or ``sampled: ...`` with the rule, and for the
            generic path why no kernel serves the layer.
    """

    path: str
    layer: str
    tensors: tuple[str, ...]
    route: str
    estimator: str

    @property
    def generic(self) -> bool:
        """Whether the layer takes the generic path."""
        return self.route == "generic"


@dataclass
class BlockReport:
    """One block of one stack.

    Attributes:
        stack: Name of the stack.
        index: Position in the stack.
        path: Module path of the block.
        status: ``"replaced"``, ``"kept"`` (not selected, or first/last) or ``"skipped"`` (selected but cannot
            be replaced; ``reason`` says why).
        prev: Path of the previous block (for replaced and skipped blocks).
        next: Path of the next block.
        params_saved: Trainable parameters removed by replacing the block (before adding its scalars).
        reason: Why the block has this status.
        scalars: Current values of the site's parameters (e.g. ``{"a": [0.5], "b": [0.5]}``).
        synthesized: Paths (inside the block) of the synthesized tensors (``fused`` is a deprecated alias).
        kept_tensors: ``(path, reason)`` of the block's tensors that stay its own (shared with another
            module, or, with shape adaptation, without a usable counterpart in either neighbour).
        adapted: ``(path, how)`` of the synthesized tensors whose neighbour tensors are shape-adapted, e.g.
            ``("conv1.weight", "prev: as is; next: slice dim 0 128->64")``.
        init: For a replaced block, how its scalars started: ``"fit"`` (least squares to its neighbours,
            ``init="fit"``), ``"policy"`` (the policy's :meth:`~replace_wrap.Policy.initial_scalars`),
            or the constant ``"(a, b)"`` (followed by ``", then the checkpoint's scalars"`` where a load
            re-applied a fitted conversion and fitted nothing).
        layers: For a replaced block, each layer holding synthesized tensors with its path and estimator
            (:class:`LayerRoute`), as decided at conversion (a kernel registered later serves too; a kernel may
            still decline single calls, e.g. under ``torch.no_grad``).
    """

    stack: str
    index: int
    path: str
    status: str
    prev: str | None = None
    next: str | None = None
    params_saved: int = 0
    reason: str = ""
    scalars: dict[str, list[float]] | None = None
    synthesized: tuple[str, ...] = ()
    kept_tensors: tuple[tuple[str, str], ...] = ()
    adapted: tuple[tuple[str, str], ...] = ()
    layers: tuple[LayerRoute, ...] = ()
    init: str = ""

    @property
    def fused(self) -> tuple[str, ...]:
        """Deprecated alias of :attr:`synthesized` (the 0.1 name)."""
        return self.synthesized


@dataclass
class ConversionReport:
    """The result of :func:`replace_wrap.plan`, also kept by :func:`replace_wrap.convert`.

    ``str(report)`` renders a table, :meth:`summary` a single line, :meth:`to_dict` plain JSON.
    """

    route: str
    policy: str
    config: ReplaceConfig
    blocks: list[BlockReport]
    stacks: list[tuple[str, int]]
    trainable_before: int
    trainable_after: int
    notes: list[str] = field(default_factory=list)
    applied: bool = False

    @property
    def replaced(self) -> list[BlockReport]:
        """The replaced blocks."""
        return [b for b in self.blocks if b.status == "replaced"]

    @property
    def skipped(self) -> list[BlockReport]:
        """The blocks the policy selected but that could not be replaced."""
        return [b for b in self.blocks if b.status == "skipped"]

    @property
    def trainable_ratio(self) -> float:
        """Trainable parameters after / before."""
        return self.trainable_after / self.trainable_before if self.trainable_before else 1.0

    def summary(self) -> str:
        """One line: blocks replaced, trainable parameters before and after, analysis route."""
        n_stacks = len({b.stack for b in self.replaced})
        verb = "replaced" if self.applied else "would be replaced"
        return (
            f"{len(self.replaced)} of {len(self.blocks)} blocks {verb} in {n_stacks} "
            f"stack{'s' if n_stacks != 1 else ''}; trainable parameters {_human(self.trainable_after)} of "
            f"{_human(self.trainable_before)} ({100 * self.trainable_ratio:.1f}%); analysis: {self.route}"
        )

    def layer_summary(self) -> str:
        """One line on the replaced layers' paths and estimators, e.g. ``20 on kernels (linear x20: sampled ...)``."""
        groups: dict[tuple[str, str, str], int] = {}
        for b in self.replaced:
            for r in b.layers:
                key = (r.route, r.layer, r.estimator)
                groups[key] = groups.get(key, 0) + 1
        if not groups:
            return ""
        fast = [(k, n) for k, n in groups.items() if k[0] != "generic"]
        slow = [(k, n) for k, n in groups.items() if k[0] == "generic"]
        parts = []
        if fast:
            parts.append(f"{sum(n for _, n in fast)} on layer kernels (" + "; ".join(
                f"{layer} x{n}: {est}" for (_, layer, est), n in fast) + ")")
        if slow:
            parts.append(f"{sum(n for _, n in slow)} on the generic path (" + "; ".join(
                f"{layer} x{n}: {est}" for (_, layer, est), n in slow) + ")")
        return "replaced layers: " + ", ".join(parts)

    def init_summary(self) -> str:
        """One line on how the replaced blocks' scalars started, e.g. ``scalars start: fit x3``."""
        groups: dict[str, int] = {}
        for b in self.replaced:
            groups[b.init] = groups.get(b.init, 0) + 1
        if not groups:
            return ""
        return "scalars start: " + "; ".join(f"{how} x{n}" for how, n in groups.items())

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d

    def __str__(self) -> str:
        header = ("stack", "#", "block", "status", "prev", "next", "scalars", "saved", "reason")
        rows = [header]
        for b in self.blocks:
            rows.append(
                (
                    b.stack, str(b.index), b.path, b.status, b.prev or "", b.next or "", _scalars(b.scalars),
                    _human(b.params_saved) if b.params_saved else "", b.reason,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
        extra = [line for line in (self.layer_summary(), self.init_summary()) if line]
        tail = [self.summary()] + extra + [f"note: {n}" for n in self.notes]
        return "\n".join([*lines, *tail])


def _scalars(values: dict[str, list[float]] | None) -> str:
    if not values:
        return ""
    parts = []
    for k, v in values.items():
        parts.append(f"{k}={v[0]:.3g}" if len(v) == 1 else f"{k}~{sum(v) / len(v):.3g}(x{len(v)})")
    return " ".join(parts)


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def stored_report(model: nn.Module) -> ConversionReport | None:
    """The report ``convert`` kept on ``model`` (scalars as at conversion), or ``None`` if not converted."""
    return model.__dict__.get(REPORT_ATTR)


def converted_module(model: nn.Module) -> nn.Module | None:
    """The module that ``convert`` was called on: ``model`` itself, or the first submodule that carries a report.

    A converted model is often wrapped afterwards (PEFT's ``PeftModel``, a ``LightningModule``, DDP's
    ``module``); the verbs that read the conversion accept the wrapper.
    """
    if REPORT_ATTR in model.__dict__:
        return model
    return next((m for m in model.modules() if REPORT_ATTR in m.__dict__), None)


def converted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module inside ``model`` (itself included) that ``convert`` was called on, with its path, in module
    order: more than one when submodules were converted separately (an encoder and a decoder, two towers)."""
    return [(path, m) for path, m in model.named_modules() if REPORT_ATTR in m.__dict__]
