"""convert / merge / revert / plan / report: orchestration only (analyse -> select -> rewrite -> report)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import hooks
from .config import ReplaceConfig
from .errors import (
    AlreadyConvertedError,
    ConfigError,
    MergeError,
    NotConvertedError,
    NothingToReplaceError,
    PolicyError,
)
from .graph import analyse
from .hooks import SITE_ATTR, ReplacementSite
from .matching import BlockMatch, Ownership, match_block
from .policy import Every, Policy, PolicyLike, as_policy, validate_selection
from .report import BlockReport, ConversionReport
from .rules import get_rule

__all__ = ["convert", "merge", "plan", "report", "revert"]

_REPORT_ATTR = "_replace_wrap_report"


def convert(
    model: nn.Module,
    every: int | None = None,
    *,
    policy: PolicyLike | None = None,
    config: ReplaceConfig | None = None,
    example_inputs: Any = None,
    trace: bool = True,
    **options: Any,
) -> nn.Module:
    """Replace blocks of ``model``'s stacks in place and return the same object.

    Each replaced block keeps its module object, but its own tensors are no longer parameters: on every
    forward they are synthesized as ``a * W_prev + b * W_next`` from the same tensors of its neighbours, with
    learnable fp32 scalars ``a, b`` registered as ``block.replacement``. The class, forward signature and
    outputs of ``model`` are unchanged; :func:`merge` turns it back into a plain model.

    Args:
        model: The model to convert, in place.
        every: Replace every ``every``-th block of each stack (``every=2``: blocks 1, 3, 5, ...). Shorthand
            for ``policy=Every(every)``; the default when neither is given is ``Every(2)``.
        policy: A :class:`~replace_wrap.Policy` or a callable ``fn(module, path) -> bool``.
        config: A :class:`~replace_wrap.ReplaceConfig`; keyword ``options`` override its fields.
        example_inputs: Inputs for the ``torch.export`` analysis route, used when torch.fx cannot trace.
        trace: ``False`` skips graph capture and analyses the module tree only.
        **options: Fields of :class:`~replace_wrap.ReplaceConfig` (``rule=``, ``scalars=``, ...).

    Returns:
        ``model`` itself. :func:`report` tells what was replaced.

    Raises:
        AlreadyConvertedError: If ``model`` is already converted.
        NothingToReplaceError: If no block can be replaced (the message says why).
        PolicyError: If the policy selects a first/last block, adjacent blocks or a missing index.
        ConfigError: For invalid options.

    Example:
        >>> import torch, replace_wrap
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(5)])
        >>> net = replace_wrap.convert(net, every=2)
        >>> [b.path for b in replace_wrap.report(net).replaced]
        ['1', '3']
    """
    cfg = _resolve_config(config, options)
    pol = _resolve_policy(every, policy)
    _check_not_converted(model)
    planned = _plan(model, pol, cfg, example_inputs, trace)
    if not planned.targets:
        raise NothingToReplaceError(_nothing_message(model, planned.report), planned.report)
    _apply(model, planned, cfg)
    return model


def plan(
    model: nn.Module,
    every: int | None = None,
    *,
    policy: PolicyLike | None = None,
    config: ReplaceConfig | None = None,
    example_inputs: Any = None,
    trace: bool = True,
    **options: Any,
) -> ConversionReport:
    """What :func:`convert` would do with the same arguments, without changing ``model``.

    Example:
        >>> import torch, replace_wrap
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(5)])
        >>> replace_wrap.plan(net).summary()
        '2 of 5 blocks would be replaced in 1 stack; trainable parameters 220 of 360 (61.1%); analysis: fx'
    """
    cfg = _resolve_config(config, options)
    pol = _resolve_policy(every, policy)
    _check_not_converted(model)
    return _plan(model, pol, cfg, example_inputs, trace).report


def report(model: nn.Module) -> ConversionReport:
    """The report of a converted model, with the scalars' current values.

    Raises:
        NotConvertedError: If ``model`` was not converted.
    """
    stored = model.__dict__.get(_REPORT_ATTR)
    if stored is None:
        raise NotConvertedError(
            f"{type(model).__name__} has no conversion report: it was not converted with replace_wrap.convert "
            "(or was merged/reverted since). Use replace_wrap.plan(model) to preview a conversion."
        )
    out = dataclasses.replace(stored, blocks=[dataclasses.replace(b) for b in stored.blocks])
    live = {path: site for path, _, site in _sites(model)}
    for b in out.blocks:
        if b.status == "replaced" and b.path in live:
            b.scalars = _scalar_values(live[b.path])
    return out


def merge(model: nn.Module) -> nn.Module:
    """Materialize every synthesized tensor as an ordinary parameter; return the plain model.

    The state_dict keys are those of the original architecture again, outputs equal the converted model's,
    every tensor is trainable again (with its original ``requires_grad``). Atomic: nothing changes unless
    every synthesized tensor is finite.

    Raises:
        NotConvertedError: If ``model`` has no replaced blocks.
        MergeError: If a synthesized tensor is not finite (names the block, tensor and scalars).
    """
    sites = _require_sites(model, "merge")
    planned: list[tuple[nn.Module, ReplacementSite, list[tuple[nn.Module, str, torch.Tensor]]]] = []
    with torch.no_grad():
        for path, block, site in sites:
            tensors = []
            for k, (leaf, name) in enumerate(_targets(block, site)):
                value = getattr(leaf, name).detach().clone()
                if not torch.isfinite(value).all():
                    raise MergeError(
                        f"cannot merge: the synthesized tensor {site.tensor_names[k]!r} of block {path!r} is not "
                        f"finite (scalars {_scalar_values(site)}); the model was left unchanged. Check the training "
                        "for divergence, or replace_wrap.revert(model) if it was converted with keep_original=True."
                    )
                tensors.append((leaf, name, value))
            planned.append((block, site, tensors))
    for block, site, tensors in planned:
        _restore_block(block, site, tensors)
    model.__dict__.pop(_REPORT_ATTR, None)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Restore the replaced blocks' original tensors (needs ``keep_original=True``); drop the scalars.

    Raises:
        NotConvertedError: If ``model`` has no replaced blocks.
        MergeError: If it was converted without ``keep_original=True``.
    """
    sites = _require_sites(model, "revert")
    missing = [path for path, _, site in sites if not site.has_originals]
    if missing:
        raise MergeError(
            f"cannot revert block {missing[0]!r}: it was converted without keep_original=True, so its original "
            "tensors were not kept. Use replace_wrap.merge(model) to keep the synthesized tensors instead."
        )
    for _, block, site in sites:
        tensors = [
            (leaf, name, site.get_buffer(f"original_{k}").detach().clone())
            for k, (leaf, name) in enumerate(_targets(block, site))
        ]
        _restore_block(block, site, tensors)
    model.__dict__.pop(_REPORT_ATTR, None)
    return model


# --- planning --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    path: str
    block: nn.Module
    prev_path: str
    next_path: str
    match: BlockMatch


@dataclass
class _Plan:
    report: ConversionReport
    targets: list[_Target]


def _plan(model: nn.Module, pol: Policy, cfg: ReplaceConfig, example_inputs: Any, trace: bool) -> _Plan:
    analysis = analyse(model, example_inputs=example_inputs, trace=trace)
    stacks = analysis.stacks
    selections = pol.select_all(stacks, model)
    if len(selections) != len(stacks):
        raise PolicyError(f"{pol!r}.select_all returned {len(selections)} selections for {len(stacks)} stacks")
    owners = Ownership(model)
    rule = get_rule(cfg.rule)
    blocks: list[BlockReport] = []
    targets: list[_Target] = []
    saved_total = scalars_total = 0
    for stack, selected in zip(stacks, selections):
        chosen = set(validate_selection(stack, selected))
        n = len(stack)
        for i, (path, block) in enumerate(zip(stack.paths, stack.modules)):
            if i not in chosen:
                reason = "first block of the stack" if i == 0 else "last block of the stack" if i == n - 1 else (
                    f"not selected by {pol!r}"
                )
                blocks.append(BlockReport(stack.name, i, path, "kept", reason=reason))
                continue
            prev_path, next_path = stack.paths[i - 1], stack.paths[i + 1]
            entry = BlockReport(stack.name, i, path, "skipped", prev=prev_path, next=next_path)
            blocks.append(entry)
            if SITE_ATTR in block._modules or hasattr(block, SITE_ATTR):
                entry.reason = f"the block already has an attribute {SITE_ATTR!r}"
                continue
            m = match_block(block, stack.modules[i - 1], stack.modules[i + 1], path, prev_path, next_path, owners)
            entry.kept_tensors = tuple(m.kept)
            if m.problem:
                entry.reason = m.problem
                continue
            n_sets = len(m.fused) if cfg.scalars == "tensor" else 1
            init = rule.init_params(n_sets, cfg.init)
            entry.status = "replaced"
            entry.fused = tuple(t.rel for t in m.fused)
            entry.params_saved = sum(t.numel for t in m.fused if t.leaf._parameters[t.name].requires_grad)
            entry.scalars = {"a": [cfg.init[0]] * n_sets, "b": [cfg.init[1]] * n_sets}
            entry.reason = f"{len(m.fused)} tensors synthesized" + (
                f"; {len(m.kept)} kept as its own ({m.kept[0][0]}: {m.kept[0][1]})" if m.kept else ""
            )
            saved_total += entry.params_saved
            scalars_total += sum(t.numel() for t in init.values())
            targets.append(_Target(path, block, prev_path, next_path, m))
    before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rep = ConversionReport(
        route=analysis.route,
        policy=repr(pol),
        config=cfg,
        blocks=blocks,
        stacks=[(s.name, len(s)) for s in stacks],
        trainable_before=before,
        trainable_after=before - saved_total + scalars_total,
        notes=list(analysis.notes),
    )
    return _Plan(rep, targets)


# --- rewriting -------------------------------------------------------------------------------------------


def _apply(model: nn.Module, planned: _Plan, cfg: ReplaceConfig) -> None:
    """Rewrite every target; on any failure undo what was done, so the model is exactly as before."""
    undo: list[Callable[[], None]] = []
    try:
        for t in planned.targets:
            fused = t.match.fused
            first = fused[0].leaf._parameters[fused[0].name]
            site = ReplacementSite(
                cfg.rule,
                len(fused) if cfg.scalars == "tensor" else 1,
                cfg.init,
                tuple(f.rel for f in fused),
                detach=cfg.neighbour_grad == "detached",
                prev_path=t.prev_path,
                next_path=t.next_path,
                originals=[f.leaf._parameters[f.name] for f in fused] if cfg.keep_original else None,
                fast_path=cfg.fast_path,
                ab_grad_sample=None if cfg.ab_grad_sample == 1.0 else cfg.ab_grad_sample,
            ).to(first.device)
            site.requires_grad_flags = tuple(f.leaf._parameters[f.name].requires_grad for f in fused)
            t.block.add_module(SITE_ATTR, site)
            undo.append(lambda b=t.block: b._modules.pop(SITE_ATTR))
            by_leaf: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
            for k, f in enumerate(fused):
                by_leaf.setdefault(id(f.leaf), (f.leaf, {}))[1][f.name] = (
                    site, site.index_of(k), f.prev_leaf, f.next_leaf
                )
            for leaf, sources in by_leaf.values():
                saved = {name: leaf._parameters[name] for name in sources}
                hooks.install(leaf, sources)
                undo.append(lambda leaf=leaf, saved=saved: hooks.uninstall(leaf, saved))
            if cfg.recompute:
                hooks.set_recompute(t.block, True)
                undo.append(lambda b=t.block: hooks.set_recompute(b, False))
        planned.report.applied = True
        object.__setattr__(model, _REPORT_ATTR, planned.report)
    except BaseException:
        for step in reversed(undo):
            step()
        planned.report.applied = False
        raise


def _restore_block(block: nn.Module, site: ReplacementSite, tensors: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    flags = getattr(site, "requires_grad_flags", (True,) * len(tensors))
    by_leaf: dict[int, tuple[nn.Module, dict[str, nn.Parameter]]] = {}
    for (leaf, name, value), flag in zip(tensors, flags):
        by_leaf.setdefault(id(leaf), (leaf, {}))[1][name] = nn.Parameter(value, requires_grad=flag)
    for leaf, params in by_leaf.values():
        hooks.uninstall(leaf, params)
    hooks.set_recompute(block, False)
    del block._modules[SITE_ATTR]


# --- helpers ---------------------------------------------------------------------------------------------


def _resolve_config(config: ReplaceConfig | None, options: dict[str, Any]) -> ReplaceConfig:
    if config is not None and not isinstance(config, ReplaceConfig):
        raise ConfigError(f"config must be a replace_wrap.ReplaceConfig, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(ReplaceConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for convert(); options are the ReplaceConfig fields {sorted(known)}"
        )
    base = config or ReplaceConfig()
    return dataclasses.replace(base, **options) if options else base


def _resolve_policy(every: Any, policy: PolicyLike | None) -> Policy:
    if every is not None and policy is not None:
        raise PolicyError("pass either every= or policy=, not both (every=k is shorthand for policy=Every(k))")
    if policy is not None:
        return as_policy(policy)
    return Every(2 if every is None else every)


def _check_not_converted(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"replace_wrap works on torch.nn.Module instances, got {type(model).__name__}")
    for path, m in model.named_modules():
        if isinstance(m, ReplacementSite) or hooks.is_swapped(m):
            raise AlreadyConvertedError(
                f"{type(model).__name__} is already converted (replaced block at {path.rsplit('.', 1)[0]!r}); "
                "converting twice is not supported. Call replace_wrap.merge(model) first, or convert the original."
            )


def _sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, ReplacementSite]]:
    for path, block in model.named_modules():
        site = block._modules.get(SITE_ATTR)
        if isinstance(site, ReplacementSite):
            yield path, block, site


def _require_sites(model: nn.Module, verb: str) -> list[tuple[str, nn.Module, ReplacementSite]]:
    sites = list(_sites(model))
    if not sites:
        raise NotConvertedError(
            f"cannot {verb} {type(model).__name__}: it has no replaced blocks. Convert it first with "
            "replace_wrap.convert(model)."
        )
    return sites


def _targets(block: nn.Module, site: ReplacementSite) -> list[tuple[nn.Module, str]]:
    out = []
    for rel in site.tensor_names:
        leaf_path, _, name = rel.rpartition(".")
        out.append((block.get_submodule(leaf_path) if leaf_path else block, name))
    return out


def _scalar_values(site: ReplacementSite) -> dict[str, list[float]]:
    a, b = site.coefficients()
    return {"a": [float(v) for v in a.detach().float().flatten()], "b": [float(v) for v in b.detach().float().flatten()]}


def _nothing_message(model: nn.Module, rep: ConversionReport) -> str:
    name = type(model).__name__
    if not rep.stacks:
        why = "no stack of repeated blocks was found (a stack is a run of same-class child modules with parameters)"
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

