"""The plan: which blocks ``convert`` replaces, what each one synthesizes, and what that costs.

This module is the single owner of three facts that every other part of the library reads from it:

- **matching**: whether a block can be replaced and which of its tensors are synthesized from which
  neighbour tensors (:func:`assess`, built on :func:`~replace_wrap.surgery.matching.match_block` with the
  config's ``adapt_shapes``);
- **scalar sets**: how many sets of scalars a block gets (:func:`scalar_sets`) and how many parameters they
  add (the rule's own count);
- **accounting**: the trainable parameters a replaced block removes and adds (:class:`Candidate`).

``convert`` and ``plan`` build their :class:`Plan` with :func:`build_plan`; whole-model policies
(:class:`~replace_wrap.Budget`, :class:`~replace_wrap.Similarity`) choose among :func:`candidates`, which
come from the same :func:`assess`, so a policy's estimate is exactly what the conversion then reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..analysis.discovery import Stack, analyse
from ..config import ReplaceConfig, using_config
from ..errors import ConfigError, PolicyError
from ..report import BlockReport, ConversionReport, LayerRoute
from ..synthesis import builtin_kernels  # noqa: F401  the built-in kernels, registered before any route is decided
from ..synthesis.layer_kernels import layer_route
from ..synthesis.rules import IntegrationRule, get_rule, is_linear_mix
from .fits import start_coefficients
from .matching import BlockMatch, Ownership, match_block
from .site import SITE_ATTR

__all__ = [
    "Candidate",
    "Plan",
    "Target",
    "assess",
    "build_plan",
    "candidates",
    "layer_routes",
    "scalar_sets",
    "trainable_count",
    "validate_selection",
]


@dataclass
class Candidate:
    """A block that ``convert`` replaces if a policy selects it, with what replacing it changes.

    Attributes:
        stack: Position of its stack in the analysis.
        index: Position in the stack (never the first or last).
        path: Module path of the block.
        prev_path: Module path of the previous block.
        next_path: Module path of the next block.
        match: What is synthesized from what (``match.problem`` is ``None`` for a candidate).
        n_sets: Number of scalar sets (1, or one per synthesized tensor with ``scalars="tensor"``).
        scalars: Trainable scalars the replacement adds (the rule's parameters for ``n_sets`` sets).
    """

    stack: int
    index: int
    path: str
    prev_path: str
    next_path: str
    block: nn.Module = field(repr=False)
    match: BlockMatch = field(repr=False)
    n_sets: int = 1
    scalars: int = 0

    @property
    def saved(self) -> int:
        """Trainable parameters removed (the synthesized tensors that were trainable)."""
        return self.match.params_saved

    @property
    def net(self) -> int:
        """Trainable parameters saved net of the scalars added."""
        return self.saved - self.scalars


@dataclass
class Target:
    """A selected candidate, with its initial scalars (``None``: the config's constant ``init``)."""

    candidate: Candidate
    coefficients: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Plan:
    """What ``convert`` will do: the report, and the blocks to rewrite."""

    report: ConversionReport
    targets: list[Target]


def trainable_count(model: nn.Module) -> int:
    """Trainable parameters of ``model`` (each shared tensor once), as reports count them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scalar_sets(match: BlockMatch, cfg: ReplaceConfig) -> int:
    """Scalar sets of a replaced block: one, or one per synthesized tensor (``scalars="tensor"``)."""
    return len(match.synthesized) if cfg.scalars == "tensor" else 1


def assess(stack: Stack, index: int, owners: Ownership, cfg: ReplaceConfig) -> BlockMatch:
    """Whether block ``index`` of ``stack`` can be replaced with ``cfg``, and what it would synthesize.

    The caller guarantees ``0 < index < len(stack) - 1``. ``problem`` is set when it cannot be replaced.
    """
    block = stack.modules[index]
    if SITE_ATTR in block._modules or hasattr(block, SITE_ATTR):
        return BlockMatch(problem=f"the block already has an attribute {SITE_ATTR!r}")
    return match_block(
        block, stack.modules[index - 1], stack.modules[index + 1], stack.paths[index], stack.paths[index - 1],
        stack.paths[index + 1], owners, adapt_shapes=cfg.adapt_shapes,
    )


def _candidate(si: int, stack: Stack, i: int, match: BlockMatch, cfg: ReplaceConfig) -> Candidate:
    n_sets = scalar_sets(match, cfg)
    scalars = sum(t.numel() for t in get_rule(cfg.rule).init_params(n_sets, cfg.constant_init).values())
    return Candidate(si, i, stack.paths[i], stack.paths[i - 1], stack.paths[i + 1], stack.modules[i], match,
                     n_sets, scalars)


def candidates(stacks: Sequence[Stack], model: nn.Module, cfg: ReplaceConfig) -> list[Candidate]:
    """Every block of every stack that ``convert`` with ``cfg`` can replace, in stack order."""
    owners = Ownership(model)
    out = []
    for si, stack in enumerate(stacks):
        for i in range(1, len(stack) - 1):
            match = assess(stack, i, owners, cfg)
            if match.problem is None:
                out.append(_candidate(si, stack, i, match, cfg))
    return out


def validate_selection(stack: Stack, indices: Iterable[int]) -> list[int]:
    """Check that ``indices`` can be replaced in ``stack``; return them sorted, else raise PolicyError."""
    n = len(stack)
    chosen = sorted(set(indices))
    for i in chosen:
        if not 0 <= i < n:
            raise PolicyError(f"index {i} does not exist in stack {stack.name!r}, which has {n} blocks")
    ends = [i for i in chosen if i in (0, n - 1)]
    if ends:
        which = ", ".join(f"{stack.paths[i]!r} ({'first' if i == 0 else 'last'})" for i in ends)
        raise PolicyError(
            f"the policy selected {which} of stack {stack.name!r}; the first and last block of a stack "
            f"must stay real (replaceable indices are 1..{n - 2})"
        )
    pairs = [(i, j) for i, j in zip(chosen, chosen[1:]) if j == i + 1]
    if pairs:
        which = ", ".join(f"{stack.paths[i]!r} and {stack.paths[j]!r}" for i, j in pairs)
        raise PolicyError(
            f"the policy selected adjacent blocks {which} of stack {stack.name!r}; a replaced block needs "
            "real neighbours, so keep at least one block between two replaced ones (e.g. Every(2))"
        )
    return chosen


def build_plan(model: nn.Module, policy: Any, cfg: ReplaceConfig, example_inputs: Any, trace: bool) -> Plan:
    """Analyse ``model``, let ``policy`` select, and assess every selected block; changes nothing."""
    analysis = analyse(model, example_inputs=example_inputs, trace=trace)
    stacks = analysis.stacks
    with using_config(cfg):
        selections = policy.select_all(stacks, model)
    if len(selections) != len(stacks):
        raise PolicyError(f"{policy!r}.select_all returned {len(selections)} selections for {len(stacks)} stacks")
    owners = Ownership(model)
    rule = get_rule(cfg.rule)
    blocks: list[BlockReport] = []
    targets: list[Target] = []
    for si, (stack, selected) in enumerate(zip(stacks, selections)):
        chosen = set(validate_selection(stack, selected))
        n = len(stack)
        for i, path in enumerate(stack.paths):
            if i not in chosen:
                reason = "first block of the stack" if i == 0 else "last block of the stack" if i == n - 1 else (
                    f"not selected by {policy!r}"
                )
                blocks.append(BlockReport(stack.name, i, path, "kept", reason=reason))
                continue
            entry = BlockReport(stack.name, i, path, "skipped", prev=stack.paths[i - 1], next=stack.paths[i + 1])
            blocks.append(entry)
            match = assess(stack, i, owners, cfg)
            entry.kept_tensors = tuple(match.kept)
            if match.problem:
                entry.reason = match.problem
                continue
            cand = _candidate(si, stack, i, match, cfg)
            with using_config(cfg):
                coeffs = _policy_scalars(policy, stack, i, match, cand.n_sets, path)
            entry.init = "policy"
            # The preview reads a few scalars as floats: build them on the CPU, whatever default device is
            # active (a meta-device init context, as in Hugging Face's from_pretrained, cannot be read).
            with torch.device("cpu"):
                if coeffs is None:
                    coeffs, entry.init = start_coefficients(match, cand.n_sets, cfg, path)
                init = _initial_params(rule, cand.n_sets, cfg.constant_init, coeffs, path, entry.init)
                entry.scalars = _preview_scalars(rule, init, cand.n_sets, cfg.constant_init, coeffs)
            _describe_replaced(entry, cand, cfg)
            targets.append(Target(cand, coeffs))
    before = trainable_count(model)
    saved = sum(t.candidate.saved for t in targets)
    added = sum(t.candidate.scalars for t in targets)
    rep = ConversionReport(
        route=analysis.route,
        policy=repr(policy),
        config=cfg,
        blocks=blocks,
        stacks=[(s.name, len(s)) for s in stacks],
        trainable_before=before,
        trainable_after=before - saved + added,
        notes=list(analysis.notes),
    )
    return Plan(rep, targets)


def _describe_replaced(entry: BlockReport, cand: Candidate, cfg: ReplaceConfig) -> None:
    m = cand.match
    entry.status = "replaced"
    entry.synthesized = tuple(t.rel for t in m.synthesized)
    entry.layers = layer_routes(m, cfg)
    entry.params_saved = cand.saved
    entry.adapted = tuple((t.rel, t.describe()) for t in m.synthesized if t.adapted)
    entry.reason = f"{len(m.synthesized)} tensors synthesized" + (
        f" ({len(entry.adapted)} shape-adapted)" if entry.adapted else ""
    ) + (f"; {len(m.kept)} kept as its own ({m.kept[0][0]}: {m.kept[0][1]})" if m.kept else "")


def layer_routes(match: BlockMatch, cfg: ReplaceConfig) -> tuple[LayerRoute, ...]:
    """Each layer of a replaced block that holds synthesized tensors, with its path and estimator."""
    by_layer: dict[int, list[Any]] = {}
    for t in match.synthesized:
        by_layer.setdefault(id(t.layer), []).append(t)
    linear = is_linear_mix(get_rule(cfg.rule))
    routes = []
    for tensors in by_layer.values():
        layer = tensors[0].layer
        route, estimator = layer_route(
            layer, tuple(t.name for t in tensors), fast_path=cfg.fast_path, linear_mix=linear,
            adapted=tuple(t.name for t in tensors if t.adapted), coupled=cfg.neighbour_grad == "coupled",
            sample=cfg.ab_grad_sample,
        )
        cls = type(layer).__dict__.get("_rw_base", type(layer))
        routes.append(LayerRoute(tensors[0].layer_path, cls.__name__, tuple(t.name for t in tensors), route, estimator))
    return tuple(routes)


def nothing_message(model: nn.Module, rep: ConversionReport) -> str:
    """Why a plan replaces no block, and what to try next (the text of ``NothingToReplaceError``)."""
    name = type(model).__name__
    if not rep.stacks:
        why = "no stack of repeated blocks was found (a stack is a run of same-class child modules with parameters)"
        why += _repeated_objects(model)
    elif all(n < 3 for _, n in rep.stacks):
        shown = ", ".join(f"{s!r} ({n} blocks)" for s, n in rep.stacks[:3])
        why = f"every stack is shorter than 3 blocks ({shown}), and first and last blocks stay real"
    elif rep.skipped:
        shown = "; ".join(f"{b.path}: {b.reason}" for b in rep.skipped[:3])
        more = f" (and {len(rep.skipped) - 3} more)" if len(rep.skipped) > 3 else ""
        why = f"every selected block had to be skipped: {shown}{more}"
    else:
        why = f"the policy {rep.policy} selected no block"
    return (
        f"convert found no block to replace in {name}: {why}. See replace_wrap.plan(model) for the per-block "
        "table, or choose the blocks with another policy."
    )


def _repeated_objects(model: nn.Module) -> str:
    """A hint for containers holding one module object at several positions (``ModuleList([block] * 6)``, a
    universal transformer): such blocks share every tensor, so none has distinct neighbours to synthesize from
    (module discovery lists each object once)."""
    for path, parent in model.named_modules():
        seen: dict[int, str] = {}
        for name, child in parent._modules.items():
            if child is None or next(child.parameters(), None) is None:  # a reused activation is no block
                continue
            if id(child) in seen:
                where = f"'{path}.{{}}'" if path else "'{}'"
                return (f"; {where.format(seen[id(child)])} and {where.format(name)} are one module object: "
                        "repeated blocks that share all their tensors have nothing to be synthesized from")
            seen[id(child)] = name
    return ""


def _policy_scalars(
    policy: Any, stack: Stack, index: int, m: BlockMatch, n_sets: int, path: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The policy's initial (a, b) for a block, checked and shaped ``(n_sets,)`` each; None for the config's."""
    found = policy.initial_scalars(stack, index, m, n_sets)
    if found is None:
        return None
    what = f"{policy!r}.initial_scalars for block {path!r}"
    if not isinstance(found, (tuple, list)) or len(found) != 2:
        raise PolicyError(f"{what} must return None or a pair (a, b), got {found!r}")
    out = []
    for name, v in zip("ab", found):
        try:
            t = torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(-1)
            t = t.expand(n_sets).clone() if t.numel() == 1 else t
        except (TypeError, ValueError, RuntimeError) as exc:
            raise PolicyError(f"{what} returned {name}={v!r}, not numbers: {exc}") from None
        if t.shape != (n_sets,):
            raise PolicyError(
                f"{what} returned {name} with {t.numel()} values; the block has {n_sets} scalar set(s) "
                f"(scalars={'tensor' if n_sets > 1 else 'block'}): return one value or {n_sets}"
            )
        if not torch.isfinite(t).all():
            raise PolicyError(f"{what} returned a non-finite {name}: {t.tolist()}")
        out.append(t)
    return out[0], out[1]


def _initial_params(
    rule: IntegrationRule, n_sets: int, init: tuple[float, float], coeffs: Any, path: str, source: str
) -> dict[str, torch.Tensor]:
    if coeffs is None:
        return rule.init_params(n_sets, init)
    try:
        return rule.params_from_coefficients(*coeffs)
    except ConfigError as exc:
        if source == "fit":
            raise ConfigError(
                f"rule {rule.name!r} cannot start block {path!r} from its least-squares fit (init='fit'/'auto'): "
                f"{exc}. Pass init=(a, b) that the rule accepts."
            ) from None
        raise ConfigError(
            f"rule {rule.name!r} cannot start block {path!r} from the policy's scalars: {exc}. Use a rule "
            "that can express them, or a policy without initial scalars."
        ) from None


def _preview_scalars(
    rule: IntegrationRule, params: dict[str, torch.Tensor], n_sets: int, init: tuple[float, float], coeffs: Any
) -> dict[str, list[float]]:
    """The (a, b) the site will start with, as the report shows them (through the rule, e.g. clamped)."""
    try:
        a, b = rule.coefficients(SimpleNamespace(**params, n_sets=n_sets))  # type: ignore[arg-type]
    except AttributeError:  # a rule whose coefficients read state the preview does not have
        a, b = coeffs if coeffs is not None else (torch.full((n_sets,), init[0]), torch.full((n_sets,), init[1]))
    return {"a": [float(v) for v in a.detach().flatten()], "b": [float(v) for v in b.detach().flatten()]}
