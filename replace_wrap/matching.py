"""Which tensors of a replaced block are synthesized from which tensors of its neighbours.

A tensor of the replaced block is synthesized from the *same-named* tensor of the previous and next block
(same path inside the block, same shape, dtype and device). Tensors that the block shares with modules
outside it (timm's CoaT shares one module between sibling blocks) are not the block's own: they stay as they
are, and the report says so. A block with an own tensor that a neighbour cannot supply is not replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["BlockMatch", "Ownership", "TensorMatch", "match_block"]


@dataclass(frozen=True)
class TensorMatch:
    """One synthesized tensor: ``leaf.<name>`` of the replaced block from the neighbours' leaves."""

    leaf_path: str
    name: str
    shape: tuple[int, ...]
    leaf: nn.Module = field(repr=False, compare=False)
    prev_leaf: nn.Module = field(repr=False, compare=False)
    next_leaf: nn.Module = field(repr=False, compare=False)

    @property
    def rel(self) -> str:
        """Path of the tensor inside the block, e.g. ``"mlp.fc1.weight"``."""
        return f"{self.leaf_path}.{self.name}" if self.leaf_path else self.name

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class BlockMatch:
    """The synthesis plan of one block: what is fused, what stays, or why it cannot be replaced."""

    fused: list[TensorMatch] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (tensor path inside the block, reason)
    problem: str | None = None

    @property
    def params_saved(self) -> int:
        """Trainable parameters that replacing the block removes (the fused tensors with ``requires_grad``)."""
        return sum(t.numel for t in self.fused if t.leaf._parameters[t.name].requires_grad)


class Ownership:
    """Every path under which each module and parameter of a model is reachable (shared ones have several)."""

    def __init__(self, model: nn.Module):
        self.module_paths: dict[int, list[str]] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            self.module_paths.setdefault(id(m), []).append(path)
        self.param_paths: dict[int, list[str]] = {}
        for path, p in model.named_parameters(remove_duplicate=False):
            self.param_paths.setdefault(id(p), []).append(path)

    def outside(self, obj: nn.Module | torch.Tensor, block_path: str) -> list[str]:
        """Paths of ``obj`` that are not inside the block at ``block_path``."""
        table = self.param_paths if isinstance(obj, torch.Tensor) else self.module_paths
        prefix = f"{block_path}." if block_path else ""
        return [p for p in table.get(id(obj), []) if not (p.startswith(prefix) or p == block_path)]


def match_block(
    block: nn.Module, prev: nn.Module, next: nn.Module, block_path: str, prev_path: str, next_path: str,
    owners: Ownership,
) -> BlockMatch:
    """Plan the synthesis of ``block`` from ``prev`` and ``next``."""
    out = BlockMatch()
    for leaf_path, leaf in block.named_modules():
        for name, param in leaf._parameters.items():
            if param is None:
                continue
            rel = f"{leaf_path}.{name}" if leaf_path else name
            shared = owners.outside(leaf, block_path) or owners.outside(param, block_path)
            if shared:
                out.kept.append((rel, f"shared with {shared[0]}"))
                continue
            if not param.is_floating_point():
                out.kept.append((rel, f"dtype {param.dtype} cannot be synthesized"))
                continue
            sources = []
            for side, nb, nb_path in (("previous", prev, prev_path), ("next", next, next_path)):
                found = _counterpart(nb, leaf_path, name)
                why = _mismatch(param, found)
                if why:
                    out.problem = (
                        f"tensor {rel!r} {_describe(param)} has {why} in the {side} block {nb_path!r}"
                    )
                    return out
                sources.append(nb.get_submodule(leaf_path))
            out.fused.append(TensorMatch(leaf_path, name, tuple(param.shape), leaf, sources[0], sources[1]))
    if not out.fused:
        out.problem = "the block owns no tensor that can be synthesized" + (
            f" ({out.kept[0][0]}: {out.kept[0][1]})" if out.kept else ""
        )
    return out


def _counterpart(block: nn.Module, leaf_path: str, name: str) -> torch.Tensor | None:
    try:
        leaf = block.get_submodule(leaf_path)
    except AttributeError:
        return None
    return leaf._parameters.get(name)


def _mismatch(own: torch.Tensor, other: torch.Tensor | None) -> str | None:
    if other is None:
        return "no counterpart"
    if other.shape != own.shape:
        return f"shape {tuple(other.shape)}"
    if other.dtype != own.dtype:
        return f"dtype {other.dtype}"
    if other.device != own.device:
        return f"device {other.device}"
    return None


def _describe(t: torch.Tensor) -> str:
    return f"of shape {tuple(t.shape)}"
