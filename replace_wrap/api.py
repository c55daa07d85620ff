"""convert / merge / revert / plan / report: orchestration only.

Each verb calls the pipeline's stages in order and owns no decision of its own: ``analysis`` finds the stacks,
the policy (``selection``) chooses blocks, ``surgery.plan`` assesses them and ``surgery.apply`` rewrites the
model, ``io.guard`` records the conversion on the model, and the report says what happened.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from torch import nn

from .analysis.wrappers import key_path
from .config import ReplaceConfig
from .errors import AlreadyConvertedError, ConfigError, MergeError, NotConvertedError, NothingToReplaceError, PolicyError
from .integrations import decay, optim
from .integrations.fsdp_state import refuse_sharded
from .report import BlockReport, ConversionReport, converted_module, converted_modules, stored_report
from .selection.policies import Every, Policy, PolicyLike, as_policy
from .surgery import attachments, swap
from .surgery.apply import apply_plan, neighbour_tensors, restore_block, scalar_values, site_tensors, sites
from .surgery.notices import tell
from .surgery.plan import Plan, build_plan, nothing_message, trainable_count
from .surgery.site import SITE_ATTR, ReplacementSite
from .synthesis.rules import state_frozen

__all__ = ["convert", "merge", "plan", "report", "revert"]

logger = logging.getLogger("replace_wrap")

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
    opts = optim.as_optimizers(optimizers)
    _check_not_converted(model)
    planned = build_plan(model, pol, cfg, example_inputs, trace)
    if not planned.targets:
        raise NothingToReplaceError(nothing_message(model, planned.report), planned.report)
    removed = [[f.layer._parameters[f.name] for f in t.candidate.match.synthesized] for t in planned.targets]
    optim.check_holds(opts, [p for ps in removed for p in ps])
    _rewrite(model, planned, cfg)
    if opts:
        added = [
            [(f"{t.candidate.path}.{SITE_ATTR}.{n}", p) for n, p in t.candidate.block.get_submodule(SITE_ATTR).named_parameters()]
            for t in planned.targets
        ]
        optim.rebind(opts, list(zip(removed, added)))  # the scalars join no decayed group
    # Optimizers built later follow the usual no-decay conventions for the scalars (see integrations.decay).
    decay.exclude_from_trainer_decay()
    decay.watch_optimizers()
    tell(planned, cfg)
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
    return build_plan(model, pol, cfg, example_inputs, trace).report


def report(model: nn.Module) -> ConversionReport:
    """The report of a converted model, with the scalars' current values and live parameter counts.

    ``model`` may also be a module that holds the converted one (``report(hf_model)`` after
    ``convert(hf_model.vit)``, a ``PeftModel``, a ``LightningModule``): block paths are then given from
    ``model``, as ``model.get_submodule`` takes them.

    Raises:
        NotConvertedError: If neither ``model`` nor a module inside it was converted.
    """
    holder = converted_module(model)
    stored = None if holder is None else stored_report(holder)
    if stored is None:
        held = [path for path, _, _ in sites(model)]
        if held:  # the blocks are here, the module convert was called on is not (a wrapper rebuilt from its children)
            raise NotConvertedError(
                f"{type(model).__name__} holds replaced blocks ({', '.join(map(repr, held[:3]))}) but not the "
                "module replace_wrap.convert was called on, which keeps the conversion report (a wrapper built "
                "from its children, such as timm's FeatureListNet, holds the blocks without it). Report the "
                "converted module itself; merge(model) works on this one."
            )
        raise NotConvertedError(
            f"{type(model).__name__} has no conversion report: it was not converted with replace_wrap.convert "
            "(or was merged/reverted since). Use replace_wrap.plan(model) to preview a conversion."
        )
    prefix = "" if holder is model else next(f"{p}." for p, m in model.named_modules() if m is holder)
    out = dataclasses.replace(stored, blocks=[_prefixed(b, prefix) for b in stored.blocks])
    # by state-dict key: a block wrapped for activation checkpointing after convert is one level down now
    live = {key_path(model, path): site for path, _, site in sites(model)}
    for b in out.blocks:
        if b.status == "replaced" and key_path(model, b.path) in live:
            b.scalars = scalar_values(live[key_path(model, b.path)])
    out.notes = [*out.notes, *_gone_notes(out.blocks, {path for path, _ in model.named_modules()})]
    others = [path for path, m in converted_modules(model) if m is not holder]
    if others:  # converted separately: this report is one conversion's, and says so rather than omit them
        out.notes.append(
            f"{type(model).__name__} also holds modules converted separately, not in this table: "
            f"{', '.join(map(repr, others))} (report each: replace_wrap.report(model.get_submodule(path))). A "
            "conversion record holds one conversion: replace_wrap.save refuses this model, and "
            "replace_wrap.from_pretrained its save_pretrained checkpoints"
        )
    # Counted on the live model, not at conversion: weights tied after convert (Hugging Face ties embeddings
    # after construction, so from_pretrained converts before tying), or frozen since, change the count.
    out.trainable_after = trainable_count(holder)
    added = sum(p.numel() for s in live.values() for p in s.parameters() if p.requires_grad)
    out.trainable_before = out.trainable_after - added + sum(b.params_saved for b in out.replaced)
    return out


def _gone_notes(blocks: list[BlockReport], present: set[str]) -> list[str]:
    # The table is the conversion's; blocks removed since (timm's prune_intermediate_layers truncates a stack)
    # would read as present, and a replaced block whose neighbour left still computes with it, untrained.
    gone = [b.path for b in blocks if b.path not in present]
    if not gone:
        return []
    notes = [f"no longer in the model (removed after convert): {', '.join(gone)}"]
    for b in blocks:
        orphaned = [n for n in (b.prev, b.next) if n in gone]
        if b.status == "replaced" and b.path in present and orphaned:
            notes.append(
                f"{b.path} still synthesizes from {', '.join(orphaned)}, which the model no longer holds or "
                "trains; state_dict() refuses: merge first (replace_wrap.merge(model)), or convert the changed "
                "model again"
            )
    return notes


def _prefixed(b: BlockReport, prefix: str) -> BlockReport:
    if not prefix:
        return dataclasses.replace(b)
    return dataclasses.replace(
        b, stack=prefix + b.stack, path=prefix + b.path, prev=b.prev and prefix + b.prev, next=b.next and prefix + b.next
    )


def merge(model: nn.Module, *, optimizers: Any = None) -> nn.Module:
    """Materialize every synthesized tensor as an ordinary parameter; return the plain model.

    The state_dict keys are those of the original architecture again, outputs equal the converted model's,
    every tensor is trainable again (with its original ``requires_grad``). Atomic: nothing changes unless
    every synthesized tensor is finite.

    Args:
        model: A converted model.
        optimizers: An optimizer (or a list of them) that trains the converted model, to keep training the
            merged one: it is rebound in place, dropping the scalars (and their state) and training each
            block's restored tensors with the options of the group that held the block's scalars and the
            weight decay their neighbours' same tensors have in it (a decayed tensor in a decayed twin of that
            group: an existing one, or a new one with the optimizer's weight decay, logged); from the scalars'
            own group of :func:`param_groups`, in their neighbours' group. Without it, such an optimizer keeps
            updating scalars that no longer exist and never trains the restored tensors.

    Raises:
        NotConvertedError: If ``model`` has no replaced blocks.
        MergeError: If a synthesized tensor is not finite (names the block, tensor and scalars).
        ConfigError: If an optimizer in ``optimizers`` holds none of the model's scalars.

    Example:
        >>> import torch, replace_wrap
        >>> net = replace_wrap.convert(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)]))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> net = replace_wrap.merge(net, optimizers=opt)
        >>> sum(p.numel() for g in opt.param_groups for p in g["params"])  # every tensor of the plain model
        100
    """
    refuse_sharded(model, "merge")  # FSDP2: each rank holds shards; gather first (issue 14)
    found = _require_sites(model, "merge")
    planned: list[tuple[str, nn.Module, ReplacementSite, list[tuple[nn.Module, str, torch.Tensor]]]] = []
    with torch.no_grad(), state_frozen():  # a rule's state (ema) is read as it is, never moved by the merge
        for path, block, site in found:
            tensors = []
            for k, (layer, name) in enumerate(site_tensors(block, site)):
                value = getattr(layer, name).detach().clone()
                if not torch.isfinite(value).all():
                    raise MergeError(
                        f"cannot merge: the synthesized tensor {site.tensor_names[k]!r} of block {path!r} is not "
                        f"finite (scalars {scalar_values(site)}); the model was left unchanged. Check the training "
                        "for divergence, or replace_wrap.revert(model) if it was converted with keep_original=True."
                    )
                tensors.append((layer, name, value))
            planned.append((path, block, site, tensors))
    _unconvert(model, planned, optimizers)
    logger.info("replace_wrap.merge: %d replaced block(s) materialized as plain parameters", len(planned))
    return model


def revert(model: nn.Module, *, optimizers: Any = None) -> nn.Module:
    """Restore the replaced blocks' original tensors (needs ``keep_original=True``); drop the scalars.

    Args:
        model: A converted model.
        optimizers: As for :func:`merge`: rebound in place to the restored tensors.

    Raises:
        NotConvertedError: If ``model`` has no replaced blocks.
        MergeError: If it was converted without ``keep_original=True``.
    """
    refuse_sharded(model, "revert")
    found = _require_sites(model, "revert")
    missing = [path for path, _, site in found if not site.has_originals]
    if missing:
        raise MergeError(
            f"cannot revert block {missing[0]!r}: it was converted without keep_original=True, so its original "
            "tensors were not kept. Use replace_wrap.merge(model) to keep the synthesized tensors instead."
        )
    planned = [
        (path, block, site, [
            (layer, name, site.get_buffer(f"original_{k}").detach().clone())
            for k, (layer, name) in enumerate(site_tensors(block, site))
        ])
        for path, block, site in found
    ]
    _unconvert(model, planned, optimizers)
    return model


def _unconvert(
    model: nn.Module,
    planned: list[tuple[str, nn.Module, ReplacementSite, list[tuple[nn.Module, str, torch.Tensor]]]],
    optimizers: Any,
) -> None:
    """Restore every block (``merge``/``revert``), rebind the optimizers, forget the conversion."""
    opts = optim.as_optimizers(optimizers)
    scalars = [list(site.parameters()) for _, _, site, _ in planned]
    optim.check_holds(opts, [p for ps in scalars for p in ps], what="the scalars of the replaced blocks")
    names = [[f"{path}.{rel}" if path else rel for rel in site.tensor_names] for path, _, site, _ in planned]
    # each restored tensor's neighbours, read before the restore drops the sources
    neighbours = {n: neighbour_tensors(layer, name) for (*_, tensors), ns in zip(planned, names)
                  for n, (layer, name, _) in zip(ns, tensors)}
    for _, block, site, tensors in planned:
        restore_block(block, site, tensors)
    if opts:
        restored, layers = [], {}
        for (*_, tensors), ns in zip(planned, names):
            restored.append([(n, getattr(layer, name)) for n, (layer, name, _) in zip(ns, tensors)])
            layers.update({n: layer for n, (layer, _, _) in zip(ns, tensors)})
        # restored tensors take weight decay as their neighbours' same tensors do (see optim.beside_neighbours)
        convention = lambda n, p: decay.decays(n, p, layers[n])  # noqa: E731
        optim.rebind(opts, list(zip(scalars, restored)), optim.beside_neighbours(neighbours, convention))
    _forget(model)


# --- helpers ---------------------------------------------------------------------------------------------


def _rewrite(model: nn.Module, planned: Plan, cfg: ReplaceConfig) -> None:
    """Apply the plan and record it on the model; on any failure the model is exactly as it was."""
    undo: list[Callable[[], None]] = []
    try:
        apply_plan(model, planned, cfg, undo)
        planned.report.applied = True
        attachments.attach_all(model, planned.report)
    except BaseException:
        for step in reversed(undo):
            step()
        planned.report.applied = False
        raise


def _forget(model: nn.Module) -> None:
    """Drop the report, the state-dict guard, the config record ...: the model is plain again."""
    attachments.detach_all(model)


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
    refuse_sharded(model, "convert")  # FSDP2 shards: convert first, then shard (issue 14)
    for path, m in model.named_modules():
        if isinstance(m, ReplacementSite) or swap.is_swapped(m):
            raise AlreadyConvertedError(
                f"{type(model).__name__} is already converted (replaced block at {path.rsplit('.', 1)[0]!r}); "
                "converting twice is not supported. Call replace_wrap.merge(model) first, or convert the original."
            )


def _require_sites(model: nn.Module, verb: str) -> list[tuple[str, nn.Module, ReplacementSite]]:
    found = list(sites(model))
    if not found:
        raise NotConvertedError(
            f"cannot {verb} {type(model).__name__}: it has no replaced blocks. Convert it first with "
            "replace_wrap.convert(model)."
        )
    return found
