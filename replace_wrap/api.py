"""convert / merge / revert / plan / report: orchestration only (analyse -> select -> rewrite -> report)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import _optim, hooks
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
from .policy import Every, Policy, PolicyLike, as_policy, using_config, validate_selection
from .report import BlockReport, ConversionReport
from .rules import IntegrationRule, get_rule

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
    optimizers: Any = None,
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
        optimizers: An optimizer (or a list of them) created before ``convert``: it is rebound in place, so it
            drops the removed tensors (and their state) and trains each block's scalars in the parameter group
            that held the block's tensors. Without it, an optimizer created before ``convert`` silently keeps
            the removed tensors and never trains the scalars: create optimizers after ``convert``.
        **options: Fields of :class:`~replace_wrap.ReplaceConfig` (``rule=``, ``scalars=``, ...).

    Returns:
        ``model`` itself. :func:`report` tells what was replaced. A converted Hugging Face model also records
        the conversion in ``model.config`` (saved by ``save_pretrained``; see :mod:`replace_wrap.persistence`).

    Raises:
        AlreadyConvertedError: If ``model`` is already converted.
        NothingToReplaceError: If no block can be replaced (the message says why).
        PolicyError: If the policy selects a first/last block, adjacent blocks or a missing index.
        ConfigError: For invalid options, or an optimizer that holds none of the removed tensors.

    Example:
        >>> import torch, replace_wrap
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(5)])
        >>> net = replace_wrap.convert(net, every=2)
        >>> [b.path for b in replace_wrap.report(net).replaced]
        ['1', '3']
    """
    cfg = _resolve_config(config, options)
    pol = _resolve_policy(every, policy)
    opts = _optim.as_optimizers(optimizers)
    _check_not_converted(model)
    planned = _plan(model, pol, cfg, example_inputs, trace)
    if not planned.targets:
        raise NothingToReplaceError(_nothing_message(model, planned.report), planned.report)
    removed = [[f.leaf._parameters[f.name] for f in t.match.fused] for t in planned.targets]
    _optim.check_holds(opts, [p for ps in removed for p in ps])
    _apply(model, planned, cfg)
    if opts:
        sites = {id(block): (path, site) for path, block, site in _sites(model)}
        added = []
        for t in planned.targets:
            path, site = sites[id(t.block)]
            added.append([(f"{path}.{SITE_ATTR}.{n}", p) for n, p in site.named_parameters()])
        _optim.rebind(opts, list(zip(removed, added)))
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
    _forget(model)
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
    _forget(model)
    return model


# --- planning --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    path: str
    block: nn.Module
    prev_path: str
    next_path: str
    match: BlockMatch
    init: tuple[torch.Tensor, torch.Tensor] | None = None  # per-set (a, b) from the policy, else config init


@dataclass
class _Plan:
    report: ConversionReport
    targets: list[_Target]


def _plan(model: nn.Module, pol: Policy, cfg: ReplaceConfig, example_inputs: Any, trace: bool) -> _Plan:
    analysis = analyse(model, example_inputs=example_inputs, trace=trace)
    stacks = analysis.stacks
    with using_config(cfg):
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
            m = match_block(
                block, stack.modules[i - 1], stack.modules[i + 1], path, prev_path, next_path, owners,
                adapt_shapes=cfg.adapt_shapes,
            )
            entry.kept_tensors = tuple(m.kept)
            if m.problem:
                entry.reason = m.problem
                continue
            n_sets = len(m.fused) if cfg.scalars == "tensor" else 1
            with using_config(cfg):
                coeffs = _policy_scalars(pol, stack, i, m, n_sets, path)
            # The preview reads a few scalars as floats: build them on the CPU, whatever default device is
            # active (a meta-device init context, as in Hugging Face's from_pretrained, cannot be read).
            with torch.device("cpu"):
                init = _initial_params(rule, n_sets, cfg.init, coeffs, path)
                entry.scalars = _preview_scalars(rule, init, n_sets, cfg.init, coeffs)
            entry.status = "replaced"
            entry.fused = tuple(t.rel for t in m.fused)
            entry.params_saved = m.params_saved
            entry.adapted = tuple((t.rel, t.describe()) for t in m.fused if t.adapted)
            entry.reason = f"{len(m.fused)} tensors synthesized" + (
                f" ({len(entry.adapted)} shape-adapted)" if entry.adapted else ""
            ) + (f"; {len(m.kept)} kept as its own ({m.kept[0][0]}: {m.kept[0][1]})" if m.kept else "")
            saved_total += entry.params_saved
            scalars_total += sum(t.numel() for t in init.values())
            targets.append(_Target(path, block, prev_path, next_path, m, coeffs))
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


def _policy_scalars(
    pol: Policy, stack: Any, index: int, m: BlockMatch, n_sets: int, path: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The policy's initial (a, b) for a block, checked and shaped ``(n_sets,)`` each; None for the config's."""
    found = pol.initial_scalars(stack, index, m, n_sets)
    if found is None:
        return None
    what = f"{pol!r}.initial_scalars for block {path!r}"
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
    rule: IntegrationRule, n_sets: int, init: tuple[float, float], coeffs: Any, path: str
) -> dict[str, torch.Tensor]:
    if coeffs is None:
        return rule.init_params(n_sets, init)
    try:
        return rule.params_from_coefficients(*coeffs)
    except ConfigError as exc:
        raise ConfigError(
            f"rule {rule.name!r} cannot start block {path!r} from the policy's scalars: {exc}. Use a rule "
            "that can express them, or a policy without initial scalars."
        ) from None


def _preview_scalars(
    rule: IntegrationRule, params: dict[str, torch.Tensor], n_sets: int, init: tuple[float, float], coeffs: Any
) -> dict[str, list[float]]:
    """The (a, b) the site will start with, as the report shows them (through the rule, e.g. clamped)."""
    from types import SimpleNamespace

    try:
        a, b = rule.coefficients(SimpleNamespace(**params, n_sets=n_sets))  # type: ignore[arg-type]
    except AttributeError:  # a rule whose coefficients read state the preview does not have
        a, b = coeffs if coeffs is not None else (torch.full((n_sets,), init[0]), torch.full((n_sets,), init[1]))
    return {"a": [float(v) for v in a.detach().flatten()], "b": [float(v) for v in b.detach().flatten()]}


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
                coefficients=t.init,
                own=[f.leaf._parameters[f.name] for f in fused],
                fast_path=cfg.fast_path,
                ab_grad_sample=None if cfg.ab_grad_sample == 1.0 else cfg.ab_grad_sample,
            ).to(first.device)
            site.requires_grad_flags = tuple(f.leaf._parameters[f.name].requires_grad for f in fused)
            t.block.add_module(SITE_ATTR, site)
            undo.append(lambda b=t.block: b._modules.pop(SITE_ATTR))
            by_leaf: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
            for k, f in enumerate(fused):
                by_leaf.setdefault(id(f.leaf), (f.leaf, {}))[1][f.name] = (
                    site, k, f.prev_leaf, f.next_leaf, f.prev_adapter, f.next_adapter
                )
            for leaf, sources in by_leaf.values():
                saved = {name: leaf._parameters[name] for name in sources}
                hooks.install(leaf, sources)
                undo.append(lambda leaf=leaf, saved=saved: hooks.uninstall(leaf, saved))
            if cfg.recompute:
                hooks.set_recompute(t.block, True)
                undo.append(lambda b=t.block: hooks.set_recompute(b, False))
            _check_synthesis(t, site, cfg.rule)
        from . import persistence  # late: persistence builds on this module

        undo.append(persistence.attach(model, planned.report))
        planned.report.applied = True
        object.__setattr__(model, _REPORT_ATTR, planned.report)
    except BaseException:
        for step in reversed(undo):
            step()
        planned.report.applied = False
        raise


def _check_synthesis(t: _Target, site: ReplacementSite, rule: str) -> None:
    """A rule must synthesize each tensor in the shape and dtype it replaces: checked once, at conversion."""
    with torch.no_grad():
        for k, (f, (leaf, name)) in enumerate(zip(t.match.fused, _targets(t.block, site))):
            value = getattr(leaf, name)
            # the replaced tensor's shape; its dtype is the neighbours' (a side may be absent, not both)
            ref = getattr(f.prev_leaf if f.prev_leaf is not None else f.next_leaf, f.name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != f.shape or value.dtype != ref.dtype:
                got = (
                    f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, torch.Tensor)
                    else type(value).__name__
                )
                raise ConfigError(
                    f"rule {rule!r} synthesized {got} for tensor {f.rel!r} of block {t.path!r}, which needs "
                    f"shape {f.shape}, dtype {ref.dtype}; fix the rule's synthesize(). The model was "
                    "left unchanged."
                )


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


def _forget(model: nn.Module) -> None:
    """Drop the report, the state-dict guard and the config record: the model is plain again."""
    from . import persistence  # late: persistence builds on this module

    persistence.detach(model)
    model.__dict__.pop(_REPORT_ATTR, None)


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

