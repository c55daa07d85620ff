"""Which tensors of a replaced block are synthesized from which tensors of its neighbours.

A tensor of the replaced block is synthesized from the *same-named* tensor of the previous and next block
(same path inside the block). Tensors that the block shares with modules outside it (timm's CoaT shares one
module between sibling blocks) are not the block's own: they stay as they are, and the report says so. So do
tensors tied between two layers inside the block (``fc2.weight is fc1.weight``): each layer would synthesize its
own copy, breaking the tie (the merged model and plain checkpoints could no longer hold it).

With shape adaptation (``ReplaceConfig(adapt_shapes=True)``, the default), a neighbour's counterpart is
*usable* if it has the same number of dimensions, dtype and device; a different shape is mapped to the
block's shape by a :class:`~replace_wrap.synthesis.adapt.ShapeAdapter` (slice / zero-pad; the spatial dimensions of a
convolution kernel centre-aligned). A side without a usable counterpart contributes zeros; a tensor for which
neither side has one stays an ordinary parameter of the block (reported as kept). Without adaptation, any
missing or differently shaped counterpart makes the block unreplaceable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..synthesis.adapt import ShapeAdapter, adapt_pair
from ..synthesis.mixing import read_neighbour

__all__ = ["BlockMatch", "Ownership", "TensorMatch", "match_block"]


@dataclass(frozen=True)
class TensorMatch:
    """One synthesized tensor: ``layer.<name>`` of the replaced block from the neighbours' layers.

    ``prev_adapter``/``next_adapter`` are ``None`` when that side's tensor has the block's shape (used as
    is), else the :class:`~replace_wrap.synthesis.adapt.ShapeAdapter` that maps it; an absent adapter means the side
    has no usable counterpart (its layer is then ``None``) and contributes zeros.
    """

    layer_path: str
    name: str
    shape: tuple[int, ...]
    layer: nn.Module = field(repr=False, compare=False)
    prev_layer: nn.Module | None = field(repr=False, compare=False)
    next_layer: nn.Module | None = field(repr=False, compare=False)
    prev_adapter: ShapeAdapter | None = None
    next_adapter: ShapeAdapter | None = None

    @property
    def rel(self) -> str:
        """Path of the tensor inside the block, e.g. ``"mlp.fc1.weight"``."""
        return f"{self.layer_path}.{self.name}" if self.layer_path else self.name

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def adapted(self) -> bool:
        """Whether either side goes through an adapter (another shape, or absent)."""
        return self.prev_adapter is not None or self.next_adapter is not None

    def sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The neighbours' current tensors mapped to this tensor's shape: what the synthesis mixes."""
        prev = None if self.prev_layer is None else read_neighbour(self.prev_layer, self.name)
        nxt = None if self.next_layer is None else read_neighbour(self.next_layer, self.name)
        if not self.adapted:
            return prev, nxt  # type: ignore[return-value]  # both present when nothing is adapted
        return adapt_pair(prev, nxt, self.prev_adapter, self.next_adapter)

    def describe(self) -> str:
        """How each side is mapped, e.g. ``"prev: as is; next: slice dim 0 128->64"``."""
        sides = (("prev", self.prev_adapter), ("next", self.next_adapter))
        return "; ".join(f"{side}: {'as is' if ad is None else ad.describe()}" for side, ad in sides)


@dataclass
class BlockMatch:
    """The synthesis plan of one block: what is synthesized, what stays, or why it cannot be replaced."""

    synthesized: list[TensorMatch] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (tensor path inside the block, reason)
    problem: str | None = None

    @property
    def params_saved(self) -> int:
        """Trainable parameters that replacing the block removes (the synthesized tensors with ``requires_grad``)."""
        return sum(t.numel for t in self.synthesized if t.layer._parameters[t.name].requires_grad)


class Ownership:
    """Every path under which each module and parameter of a model is reachable (shared ones have several)."""

    def __init__(self, model: nn.Module):
        self.module_paths: dict[int, list[str]] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            self.module_paths.setdefault(id(m), []).append(path)
        self.param_paths: dict[int, list[str]] = {}
        by_path: dict[str, int] = {}
        for path, p in model.named_parameters(remove_duplicate=False):
            self.param_paths.setdefault(id(p), []).append(path)
            by_path[path] = id(p)
        # Ties Hugging Face has yet to make: ``from_pretrained`` builds the model without them and ties after
        # loading (after the conversion its config records), so a tied pair counts as shared already.
        for prefix, m in model.named_modules():
            ties = m.__dict__.get("all_tied_weights_keys")
            for target, source in (ties.items() if isinstance(ties, dict) else ()):
                t, s = (f"{prefix}.{k}" if prefix else k for k in (target, source))
                if t in by_path and s in by_path and by_path[t] != by_path[s]:
                    self.param_paths[by_path[s]].append(t)
                    self.param_paths[by_path[t]].append(s)

    def outside(self, obj: nn.Module | torch.Tensor, block_path: str) -> list[str]:
        """Paths of ``obj`` that are not inside the block at ``block_path``."""
        table = self.param_paths if isinstance(obj, torch.Tensor) else self.module_paths
        prefix = f"{block_path}." if block_path else ""
        return [p for p in table.get(id(obj), []) if not (p.startswith(prefix) or p == block_path)]


def match_block(
    block: nn.Module,
    prev: nn.Module,
    next: nn.Module,
    block_path: str,
    prev_path: str,
    next_path: str,
    owners: Ownership,
    adapt_shapes: bool = True,
) -> BlockMatch:
    """Plan the synthesis of ``block`` from ``prev`` and ``next``.

    Args:
        block: The block to replace.
        prev: The previous block of the stack.
        next: The next block of the stack.
        block_path: Module path of ``block`` (for ownership checks and messages).
        prev_path: Module path of ``prev``.
        next_path: Module path of ``next``.
        owners: Where every module and parameter of the model is reachable.
        adapt_shapes: Map counterparts of another shape (and absent ones) instead of giving up.

    Returns:
        A :class:`BlockMatch`; ``problem`` is set when the block cannot be replaced.
    """
    out = BlockMatch()
    sides = (("previous", prev, prev_path), ("next", next, next_path))
    holders: dict[int, list[str]] = {}  # each tensor's slots (layer, name) inside the block: several if tied there
    for layer_path, layer in block.named_modules():
        for name, param in layer._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{layer_path}.{name}" if layer_path else name)
    for layer_path, layer in block.named_modules():
        for name, param in layer._parameters.items():
            if param is None:
                continue
            rel = f"{layer_path}.{name}" if layer_path else name
            shared = owners.outside(layer, block_path) or owners.outside(param, block_path)
            if shared:
                out.kept.append((rel, f"shared with {shared[0]}"))
                continue
            tied = [h for h in holders[id(param)] if h != rel]
            if tied:  # synthesized per slot, the tie would break (merge, plain checkpoints): the block keeps it
                out.kept.append((rel, f"tied to {tied[0]} inside the block"))
                continue
            if not param.is_floating_point():
                out.kept.append((rel, f"dtype {param.dtype} cannot be synthesized"))
                continue
            layers: list[nn.Module | None] = []
            adapters: list[ShapeAdapter | None] = []
            why: list[str] = []
            for side, nb, nb_path in sides:
                found = _counterpart(nb, layer_path, name)
                problem = _mismatch(param, found, strict=not adapt_shapes)
                if problem and not adapt_shapes:
                    out.problem = f"tensor {rel!r} {_describe(param)} has {problem} in the {side} block {nb_path!r}"
                    return out
                if problem:  # adaptation on: this side contributes zeros
                    why.append(f"{side} block {nb_path!r}: {problem}")
                    layers.append(None)
                    adapters.append(ShapeAdapter(None, tuple(param.shape)))
                    continue
                assert found is not None  # _mismatch returned no problem
                layers.append(nb.get_submodule(layer_path))
                adapters.append(
                    None if found.shape == param.shape
                    else ShapeAdapter(tuple(found.shape), tuple(param.shape), _centre_dims(layer, name, param))
                )
            if layers[0] is None and layers[1] is None:
                out.kept.append((rel, "no usable counterpart in either neighbour (" + "; ".join(why) + ")"))
                continue
            out.synthesized.append(
                TensorMatch(layer_path, name, tuple(param.shape), layer, layers[0], layers[1], adapters[0], adapters[1])
            )
    if not out.synthesized:
        out.problem = "the block owns no tensor that can be synthesized" + (
            f" ({out.kept[0][0]}: {out.kept[0][1]})" if out.kept else ""
        )
    return out


def _counterpart(block: nn.Module, layer_path: str, name: str) -> torch.Tensor | None:
    try:
        layer = block.get_submodule(layer_path)
    except AttributeError:
        return None
    found = layer._parameters.get(name)
    if found is None and parametrize.is_parametrized(layer, name):
        # A parametrized tensor (weight_norm, spectral_norm, orthogonal): no parameter, but a property computed
        # on every read, which the synthesis reads as it reads one. Converting before or after the
        # parametrization must give the same model: replace_wrap.load converts a model built (and parametrized)
        # afresh, so a neighbour parametrized after convert would otherwise come back as an absent side.
        # Read as the synthesis reads it (in eval mode: spectral_norm's power iteration would update its
        # buffers in training; plan and convert change nothing before they apply).
        with torch.no_grad():
            found = read_neighbour(layer, name)
    return found


def _mismatch(own: torch.Tensor, other: torch.Tensor | None, strict: bool) -> str | None:
    """Why ``other`` cannot stand in for ``own`` (``None``: usable). Without ``strict`` shapes may differ."""
    if other is None:
        return "no counterpart"
    if strict and other.shape != own.shape:
        return f"shape {tuple(other.shape)}"
    if other.dim() != own.dim():
        return f"{other.dim()}-d counterpart of shape {tuple(other.shape)}"
    if other.dtype != own.dtype:
        return f"dtype {other.dtype}"
    if other.device != own.device:
        return f"device {other.device}"
    return None


def _centre_dims(layer: nn.Module, name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The kernel dimensions of a convolution weight (centre-aligned); every other dimension aligns at 0."""
    # (out, in/groups, *kernel) for Conv*d; (in, out/groups, *kernel) for ConvTranspose*d: kernel dims are 2..
    if name == "weight" and isinstance(layer, nn.modules.conv._ConvNd):
        return tuple(range(2, param.dim()))
    return ()


def _describe(t: torch.Tensor) -> str:
    return f"of shape {tuple(t.shape)}"
