"""Verifying a checkpoint's synthesized values against what the model that loads it synthesizes from it.

A plain state dict of a converted model (:mod:`.plain`) holds, for every replaced tensor, its synthesized value
next to the neighbours and scalars that define it. A converted model that loads it rebuilds the replaced tensors
from the loaded neighbours and scalars, and the guard (:mod:`.guard`) drops the values. Where the rule that maps
neighbours to a replaced tensor differs between the model that saved and the one that loads (another plan whose
keys happen to match, another counterpart or shape adaptation, a neighbour changed after convert, a checkpoint
whose scalars or neighbours were edited, another library version), that load would silently give another model.
So :func:`mismatch` computes what the model will synthesize once it holds the state dict's tensors and compares
it with the value the state dict carries, before anything is copied.

**One owner.** Each value is read from the replaced layer itself (``layer.<name>``: the property of
:mod:`replace_wrap.surgery.swap` that every forward, ``state_dict()`` and ``merge`` read), inside
:func:`torch.func.functional_call` with the state dict's tensors in place of the site's and the neighbours'
(cast to the model's dtypes and devices, as ``load_state_dict`` copies them; as they are under ``assign=True``).
Nothing of the model is changed or copied; the rule, the adapters and the parametrizations are the layer's.

**Tolerance** (:data:`RELATIVE_TOLERANCE`): the largest ``|saved - recomputed|`` may be ``8 * eps`` of the
coarser of the two dtypes, times the saved tensor's largest magnitude or the larger of the two dtypes' smallest
normal numbers (below it fp16's spacing no longer shrinks). A round trip mixes the same values the same way,
bitwise on one device; another device (fused multiply-adds) or a cast between saving and loading (a bf16
checkpoint into an fp32 model, ``model.half()`` after saving) rounds by a few units of that dtype.

**Skipped**, with a reason on the ``"replace_wrap"`` logger (info), where the values the model will compute with
are not here to read: meta tensors (a model built on the meta device, loaded without ``assign=True``; a
checkpoint of shapes only), DTensors and modules FSDP manages (a sharded model: each rank holds shards, and its
sharded state dicts carry no synthesized values, see :mod:`.plain`). Placeholders that are no tensors (the
sharded-checkpoint check reads keys and shapes only) are not compared either.

**Cost.** One synthesis and one comparison per replaced tensor, one replaced tensor alive at a time: about what
``state_dict()`` spends writing the values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..analysis.wrappers import key_path
from ..errors import SynthesisMismatchError
from ..integrations.fsdp_state import is_managed
from ..surgery.apply import located_tensors, sites
from ..synthesis.mixing import SOURCES_ATTR, TensorSource
from ..synthesis.rules import state_frozen

__all__ = ["NEXT_STEP", "RELATIVE_TOLERANCE", "keys_read", "mismatch", "tolerance"]

logger = logging.getLogger("replace_wrap")

# Allowed max |saved - recomputed| relative to the saved tensor's largest magnitude, by the coarser dtype. 8 eps:
# two roundings of each product and sum on another device, or inputs cast to a narrower dtype, stay well inside.
_ULPS = 8
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    dt: _ULPS * torch.finfo(dt).eps for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}

# What to do next, for a state dict refused before anything was copied (the guard's case).
NEXT_STEP = (
    "Nothing was loaded. To get the model the saved values describe, load the checkpoint into the unconverted "
    "architecture (replace_wrap.load_state_dict(build(), state_dict): a plain model) and convert that; to take "
    "the scalars and neighbours as they are and drop the saved values on purpose: "
    "replace_wrap.load_state_dict(model, state_dict, strict=False)."
)


def tolerance(saved: torch.dtype, computed: torch.dtype) -> float:
    """The relative tolerance of a comparison between tensors of these dtypes: the coarser one's (0, exact, unless
    both are floating point)."""
    rels = [RELATIVE_TOLERANCE.get(d, _ULPS * torch.finfo(d).eps) for d in (saved, computed) if d.is_floating_point]
    return max(rels) if len(rels) == 2 else 0.0


class _Job(NamedTuple):
    key: str  # the synthesized value's key in the state dict
    layer: nn.Module
    name: str
    saved: torch.Tensor
    sides: tuple[str, ...]  # the neighbours' keys of the same tensor, for the message
    site: str  # the key prefix of the block's scalars, for the message


def mismatch(
    model: nn.Module, state: Mapping[str, Any], prefix: str = "", *, substitute: bool = True, assign: bool = False,
    next_step: str = NEXT_STEP,
) -> SynthesisMismatchError | None:
    """The error to raise if a synthesized value in ``state`` is not what ``model`` synthesizes from ``state``.

    Args:
        model: A converted model.
        state: A state dict for ``model`` (keys under ``prefix``); only the replaced tensors' values in it are
            compared, so a dict without them (``plain_state_dict=False``, the trainable parameters) checks nothing.
        prefix: The prefix of ``model``'s keys in ``state``.
        substitute: Compute with ``state``'s scalars and neighbours (before a load). ``False``: with the model's
            own tensors (after a load that did not go through ``load_state_dict``, such as Hugging Face's).
        assign: ``load_state_dict(..., assign=True)``: ``state``'s tensors are taken as they are, not cast.
        next_step: The error message's last sentences: what became of the load, and what to do instead.

    Returns:
        ``None`` if every value agrees within :func:`tolerance` (or nothing can be compared), else the error
        naming the first key that does not.
    """
    paths = {id(m): p for p, m in model.named_modules()}
    jobs: list[_Job] = []
    inputs: dict[str, torch.Tensor] = {}
    seen: dict[int, str | None] = {}  # input module id -> why its values are not here (None: they are)
    skipped: dict[str, str] = {}
    for key, layer, name, src in _replaced(model, prefix):
        saved = state.get(key)
        if not isinstance(saved, torch.Tensor):
            continue  # not in this dict (partial, converted-only) or a placeholder of a shape
        why = _not_here(saved)
        for m in src.inputs:
            if id(m) not in seen:
                seen[id(m)] = _collect(model, m, paths.get(id(m)), state, prefix, inputs, substitute, assign)
            why = why or seen[id(m)]
        if why:
            skipped[key] = why
            continue
        sides = tuple(_state_key(model, prefix, paths[id(m)], name) for m in src.inputs[1:] if id(m) in paths)
        jobs.append(_Job(key, layer, name, saved, sides, prefix + key_path(model, paths[id(src.site)])))
    if skipped:
        key, why = next(iter(skipped.items()))
        logger.info(
            "replace_wrap: the synthesized values of %d replaced tensors (e.g. %r) were not checked against their "
            "neighbours and scalars: %s", len(skipped), key, why,
        )
    if not jobs:
        return None
    reader = _Reader(model, jobs)
    with torch.no_grad(), state_frozen():  # reading never moves a rule's state (ema in training mode)
        found = torch.func.functional_call(reader, inputs, (), tie_weights=False, strict=False)
    if not found:
        return None
    return _error(type(model).__name__, found, next_step)


def keys_read(model: nn.Module, keys: Collection[str], prefix: str = "") -> list[str]:
    """Which of ``keys`` (a state dict's) :func:`mismatch` reads: each replaced tensor's synthesized value and
    the tensors that define it (the scalars, a rule's state, the neighbours'). A caller that holds a checkpoint on
    disk reads only these for the check (the sharded-checkpoint check does)."""
    paths = {id(m): p for p, m in model.named_modules()}
    out: dict[str, None] = {}  # ordered, without repeats
    done: set[int] = set()
    for key, _, _, src in _replaced(model, prefix):
        if key not in keys:
            continue
        out[key] = None
        for m in src.inputs:
            if id(m) in done or id(m) not in paths:
                continue
            done.add(id(m))
            for name, _ in (*m.named_parameters(), *m.named_buffers()):
                if (k := _state_key(model, prefix, paths[id(m)], name)) in keys:
                    out[k] = None
    return list(out)


def _replaced(model: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str, TensorSource]]:
    """``(key, layer, name, source)`` of every replaced tensor: its state-dict key, where it is synthesized."""
    for path, block, site in sites(model):
        for rel, layer, name in located_tensors(block, site):
            yield _key(prefix, key_path(model, path), rel), layer, name, layer.__dict__[SOURCES_ATTR][name]


def _state_key(model: nn.Module, prefix: str, path: str, name: str) -> str:
    """The state-dict key of the tensor ``name`` of the module at ``path``, as torch writes it (without the
    segments wrappers hide: :mod:`replace_wrap.analysis.wrappers`)."""
    return prefix + key_path(model, f"{path}.{name}" if path else name, tensor=True)


def _key(prefix: str, path: str, name: str) -> str:
    return f"{prefix}{path}.{name}" if path else f"{prefix}{name}"


class _Reader(nn.Module):
    """Holds the model as a submodule, so that ``functional_call`` finds its tensors by path; its forward reads
    and compares the replaced tensors one at a time."""

    def __init__(self, model: nn.Module, jobs: list[_Job]):
        super().__init__()
        self.model = model
        self.jobs = jobs

    def forward(self) -> list[tuple[_Job, float, float]]:
        found = []
        for job in self.jobs:
            diff, allowed = _difference(job.saved, getattr(job.layer, job.name))
            if not diff <= allowed:
                found.append((job, diff, allowed))
        return found


def _collect(
    model: nn.Module, module: nn.Module, path: str | None, state: Mapping[str, Any], prefix: str, inputs: dict[str, torch.Tensor],
    substitute: bool, assign: bool,
) -> str | None:
    """Put ``state``'s values of ``module``'s tensors into ``inputs`` (keyed for the reader); why they cannot be
    compared, if so."""
    if is_managed(module):
        return "FSDP manages their layers (each rank holds shards of the neighbours)"
    for name, live in (*module.named_parameters(), *module.named_buffers()):
        value = state.get(_state_key(model, prefix, path, name)) if path is not None else None
        if not (substitute and isinstance(value, torch.Tensor)):
            value = None  # the model keeps its own tensor: the one it will compute with
        # what the model holds once loaded: its own tensor, the copy into it, or (assign=True) the incoming one
        why = _not_here(value) if assign and value is not None else _not_here(live) or _not_here(value)
        if why:
            return why
        if value is None:
            continue
        if not assign:
            if value.shape != live.shape:
                return "a neighbour or scalar has another shape in the state dict (torch refuses the load)"
            value = value.detach().to(device=live.device, dtype=live.dtype)  # what load_state_dict copies in
        inputs[_key("model.", path, name)] = value
    return None


def _not_here(t: torch.Tensor | None) -> str | None:
    """Why ``t``'s values cannot be read here (``None``: they can, or there is no ``t``)."""
    if t is None:
        return None
    if hasattr(t, "device_mesh") and hasattr(t, "placements"):
        return "a DTensor (a sharded model or state dict: no rank holds the whole values)"
    if t.is_meta:
        return "a meta tensor (no values: a model built on the meta device needs load_state_dict(assign=True))"
    return None


def _difference(saved: torch.Tensor, value: torch.Tensor) -> tuple[float, float]:
    """``(max |saved - value|, allowed)``: NaN where both are NaN, and equal infinities, count as equal."""
    if tuple(saved.shape) != tuple(value.shape):
        return float("inf"), 0.0
    same_kind = saved.dtype == value.dtype and saved.device == value.device
    if not saved.numel() or (same_kind and torch.equal(saved, value)):
        return 0.0, 0.0  # a round trip in one dtype and on one device: bitwise the same, one pass to tell
    wide = torch.float64 if torch.float64 in (saved.dtype, value.dtype) else torch.float32
    s, v = saved.detach().to(device=value.device, dtype=wide), value.detach().to(wide)
    diff, scale = (s - v).abs_().max().item(), s.abs().max().item()
    if not (math.isfinite(diff) and math.isfinite(scale)):  # NaN or inf somewhere: compare those entries exactly
        same = (s == v) | (s.isnan() & v.isnan())
        diff = torch.nan_to_num((s - v).abs_().masked_fill_(same, 0.0), nan=math.inf).max().item()
        scale = torch.nan_to_num(s.abs(), nan=0.0, posinf=0.0).max().item()
    # below a dtype's smallest normal number its spacing stops shrinking with the values (fp16's subnormals are
    # 6e-8 apart): a LayerScale gamma of 1e-6 cast to fp16 is rounded by far more than 8 eps of itself
    floor = max((torch.finfo(d).tiny for d in (saved.dtype, value.dtype) if d.is_floating_point), default=0.0)
    return diff, tolerance(saved.dtype, value.dtype) * max(scale, floor)


def _error(name: str, found: list[tuple[_Job, float, float]], next_step: str) -> SynthesisMismatchError:
    job, diff, allowed = found[0]
    more = f" ({len(found) - 1} more replaced tensors differ too)" if len(found) > 1 else ""
    sides = ", ".join(repr(s) for s in job.sides) or "neighbours"
    shape = job.layer.__dict__[SOURCES_ATTR][job.name].shape(job.name)  # nothing synthesized for it
    what = (
        f"differs by up to {diff:.3g} (allowed {allowed:.3g} for {job.saved.dtype}) from what this model synthesizes"
        if tuple(job.saved.shape) == shape
        else f"has shape {tuple(job.saved.shape)}, not the shape {shape} this model synthesizes"
    )
    return SynthesisMismatchError(
        f"this checkpoint does not fit the converted {name}: it holds under {job.key!r} a synthesized value that "
        f"{what} from the checkpoint's own {sides} and scalars {job.site!r}{more}. It was saved by a model whose "
        "replaced blocks synthesize by another rule (another plan, every=, rule, counterpart or shape adaptation, a "
        "neighbour changed after convert, another replace_wrap version), or edited after saving; loaded here it "
        f"would give another model than the one saved. {next_step}",
        key=job.key, max_diff=diff, tolerance=allowed,
    )
