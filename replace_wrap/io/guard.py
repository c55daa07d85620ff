"""The state-dict guard and the Hugging Face config record: two attachments that io adds to a conversion.

**The guard.** ``convert`` registers a ``load_state_dict`` pre-hook on the converted model. It reads the state
dict before any tensor is copied and tells three kinds apart by what it holds for the replaced blocks:

- the scalars of exactly these blocks (a checkpoint of a model converted the same way): loaded. If it also
  holds the replaced tensors' synthesized values (written by :mod:`replace_wrap.io.plain` so that plain loaders
  work), those are derived data (the scalars and the neighbours define the replaced tensors) and are dropped,
  once :mod:`replace_wrap.io.verify` has checked that the dict's own neighbours and scalars synthesize them in
  this model: else it is refused with :class:`~replace_wrap.SynthesisMismatchError` (saved by a model that
  synthesizes by another rule, or edited), before anything is copied;
- tensors of the replaced blocks and no scalars (saved from an unconverted or merged model): refused with
  :class:`~replace_wrap.StateDictError`, which names the blocks and the fix;
- scalars of other blocks (a model converted differently): refused the same way.

:func:`load_state_dict` covers the other direction (a converted state dict into a model not yet converted):
one that carries the synthesized values loads as the plain model that predicts the same, one without them is
refused with the blocks to convert first. With ``strict=False`` it loads past the guard on purpose.

**The config record.** A converted Hugging Face model (one with a ``PretrainedConfig`` as ``model.config``)
gets its :class:`~replace_wrap.ConversionRecord` as ``model.config.replace_wrap``, so that ``save_pretrained``
writes it into ``config.json`` and :func:`replace_wrap.from_pretrained` can rebuild the converted model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from torch import nn

from ..analysis.wrappers import key_path, keyed_modules
from ..errors import CompatibilityError, StateDictError
from ..report import ConversionReport
from ..surgery.sources import sources_outside
from ..surgery.apply import sites
from ..surgery.attachments import register_attachment
from ..surgery.site import SITE_ATTR, ReplacementSite
from . import verify
from .plain import synthesized_keys
from .record import CONFIG_KEY, ConversionRecord

__all__ = ["converted", "is_hf_config", "load_state_dict", "whole_checked"]


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """``model.load_state_dict(state_dict, strict)`` that explains converted/unconverted mismatches.

    A converted model refuses, by itself, a state dict that holds tensors for its replaced blocks and no scalars
    (``convert`` registers a guard). This function adds the other direction, a state dict saved from a
    converted model loaded into a model that is not converted: if it holds every tensor of the replaced blocks
    (their synthesized values, written by default, see :mod:`replace_wrap.io.plain`), ``model`` loads them and
    becomes the plain model that predicts exactly as the converted one did (the scalar keys are dropped);
    without them it is refused. With ``strict=False`` it is the deliberate way past the guard: the replaced
    blocks' tensors of an unconverted state dict are then dropped and listed as unexpected keys.

    Returns:
        What ``nn.Module.load_state_dict`` returns (missing and unexpected keys).

    Raises:
        StateDictError: With ``strict=True``, if ``state_dict`` comes from a converted model without the
            replaced tensors and ``model`` is not converted (the message names the blocks to convert first),
            or the reverse.

    Example:
        >>> import torch, replace_wrap
        >>> def make():
        ...     return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])
        >>> net = replace_wrap.convert(make(), every=2)
        >>> plain = make()
        >>> _ = replace_wrap.load_state_dict(plain, net.state_dict())  # carries the replaced tensors' values
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(plain(x), net(x))
        True
        >>> sd = replace_wrap.convert(make(), every=2, plain_state_dict=False).state_dict()
        >>> replace_wrap.load_state_dict(make(), sd)
        Traceback (most recent call last):
        ...
        replace_wrap.errors.StateDictError: this state dict was saved from a converted model ...
    """
    if not strict:
        token = _GUARD_OFF.set(True)
        try:
            return model.load_state_dict(state_dict, strict=False)
        finally:
            _GUARD_OFF.reset(token)
    if not converted(model):
        theirs = _replaced_in(state_dict, model, "")
        if theirs:
            scalars = {k for k in state_dict for b in theirs if k.startswith(f"{b}.{SITE_ATTR}." if b else f"{SITE_ATTR}.")}
            modules = _by_key(model)
            absent = [k for b in theirs for k in _parameter_keys(modules[b], b) if k not in state_dict]
            if not absent:  # a plain checkpoint plus the scalars: load the plain model it describes
                return model.load_state_dict({k: v for k, v in state_dict.items() if k not in scalars}, strict=True)
            raise StateDictError(
                f"this state dict was saved from a converted model (replaced blocks {theirs}) without the replaced "
                f"tensors (e.g. {absent[0]!r}), but this {type(model).__name__} is not converted. Convert it "
                f"first, the same way: replace_wrap.convert(model, policy=replace_wrap.Paths({theirs}), <the "
                "original options>), then load. replace_wrap.save/load and save_pretrained/"
                "replace_wrap.from_pretrained record the conversion and do both."
            )
    return model.load_state_dict(state_dict, strict=True)


def _drop_hook(hooks: dict[int, Any], fn: Any) -> None:
    """Remove ``fn`` from a module's hook dict (torch may store it wrapped, with the function as ``.hook``)."""
    for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is fn]:
        del hooks[key]


def _remove_guard(model: nn.Module) -> None:
    _drop_hook(model._load_state_dict_pre_hooks, _guard)


@register_attachment("state_dict_guard", detach=_remove_guard)
def _install_guard(model: nn.Module, report: ConversionReport) -> None:
    model.register_load_state_dict_pre_hook(_guard)


def _remove_source_check(model: nn.Module) -> None:
    _drop_hook(model._state_dict_hooks, _check_sources)


@register_attachment("source_check", detach=_remove_source_check)
def _install_source_check(model: nn.Module, report: ConversionReport) -> None:
    model.register_state_dict_post_hook(_check_sources)


def _check_sources(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # A replaced layer reads the neighbour layers it was converted with. If one left the model afterwards (a
    # block swapped in, a layer quantized in place), the converted model still computes with it, but a state
    # dict holds the new module: loaded, it would give another model. The post-hook of the converted module runs
    # once every child has written its tensors, and refuses before anything is returned or saved.
    modules = {id(m) for m in module.modules()}
    tensors = {id(p) for p in module.parameters()}
    for path, layer in module.named_modules():
        missing = sources_outside(layer, modules, tensors)  # [] for a layer that synthesizes nothing
        if missing:
            raise CompatibilityError(
                f"cannot write a state dict of this converted model: its replaced layer {path!r} synthesizes its "
                f"tensors from layers of {missing} that are no longer part of the model (a neighbour module was "
                "replaced, removed or quantized after convert: a block swapped in, a stack truncated as timm's "
                "prune_intermediate_layers does, a layer quantized in place), so the state dict would load as "
                "another model. Merge "
                "first (replace_wrap.merge(model): the replaced blocks become plain layers holding what they "
                "compute now), or convert the changed model again."
            )


_PREVIOUS = "_replace_wrap_config_previous"  # the config's own value of CONFIG_KEY before convert, if any


def _drop_config_record(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if not is_hf_config(cfg) or CONFIG_KEY not in cfg.__dict__:
        return
    delattr(cfg, CONFIG_KEY)
    previous = model.__dict__.pop(_PREVIOUS, None)
    if previous is not None:  # a record the config carried before (a plain load of a converted checkpoint)
        setattr(cfg, CONFIG_KEY, previous)


@register_attachment("config_record", detach=_drop_config_record)
def _write_config_record(model: nn.Module, report: ConversionReport) -> None:
    cfg = getattr(model, "config", None)
    if not is_hf_config(cfg):
        return
    if CONFIG_KEY in cfg.__dict__:
        object.__setattr__(model, _PREVIOUS, cfg.__dict__[CONFIG_KEY])
    # The config may be shared with an enclosing model (HF's ViTModel inside ViTForImageClassification): the
    # record names the converted class, so the enclosing model's save reloads into the right submodule.
    setattr(cfg, CONFIG_KEY, ConversionRecord.from_report(report, module=type(model).__name__).to_dict())


def _guard(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    # The converted module's pre-hooks run before it or any child copies a tensor, so refusing here leaves
    # the model untouched, and the children are handed copies filtered from this dict, so keys dropped here
    # never reach them. torch passes strict=True to every pre-hook whatever the caller asked, so the guard
    # cannot tell strict=False apart: it refuses only the unmistakable case (tensors for blocks that have
    # none), and load_state_dict(..., strict=False) below is the deliberate way to drop them.
    if _SHARDS.get():  # one shard of a checkpoint that whole_checked accepted: drop its synthesized values
        for path, (block, site) in _sites(module).items():
            for key in _keys(block, path, site, prefix):
                state_dict.pop(key, None)
        return
    off = _GUARD_OFF.get()
    # values: compare the synthesized values with what the incoming neighbours and scalars give (not past the guard)
    assign = local_metadata.get("assign_to_params_buffers", False)  # load_state_dict(assign=True)
    problem = _mismatch(module, state_dict, prefix, values=not off, assign=assign)
    if problem and not off:
        raise problem


_GUARD_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("replace_wrap_guard_off", default=False)
_SHARDS: contextvars.ContextVar[bool] = contextvars.ContextVar("replace_wrap_shards", default=False)


@contextlib.contextmanager
def whole_checked(
    model: nn.Module, state: dict[str, Any], read: Callable[[list[str]], Mapping[str, Any]] | None = None
) -> Iterator[None]:
    """Around a checkpoint loaded shard by shard (``load_state_dict(shard, strict=False)`` per shard, as
    transformers' ``load_sharded_checkpoint`` does): check it on its whole key set before any shard is read.

    One shard alone cannot be told from an unconverted or differently converted state dict (it may hold a
    replaced block's synthesized values and not its scalars), so every guarded module of ``model`` checks
    ``state`` (every key of the checkpoint; the values need a ``shape`` only under ``replacement.``) on entry,
    and raises ``StateDictError`` as for a whole state dict. With ``read`` (keys -> their tensors), the
    synthesized values are then compared with what their neighbours and scalars give
    (:mod:`replace_wrap.io.verify`), reading those keys only, and ``SynthesisMismatchError`` raised as for a
    whole state dict. Inside the block the guard then only drops each shard's synthesized values.
    """
    for _, key, module in keyed_modules(model):
        if any(getattr(h, "hook", h) is _guard for h in module._load_state_dict_pre_hooks.values()):
            prefix = f"{key}." if key else ""
            problem = _mismatch(module, dict(state), prefix)
            if problem is None and read is not None:
                problem = verify.mismatch(module, read(verify.keys_read(module, state, prefix)), prefix)
            if problem:
                problem.args = (f"{problem} (checked on the whole sharded checkpoint; no shard was loaded)",)
                raise problem
    token = _SHARDS.set(True)
    try:
        yield
    finally:
        _SHARDS.reset(token)


def _mismatch(
    model: nn.Module, state: Mapping[str, Any], prefix: str, values: bool = False, assign: bool = False
) -> StateDictError | None:
    """Why ``state`` cannot be loaded into the converted ``model`` (the error to raise): it holds tensors of
    replaced blocks, or (``values``) synthesized values that its own neighbours and scalars do not give.

    A checkpoint of this very conversion (the scalars of exactly these blocks) is no mismatch: its synthesized
    values, if any, are removed from ``state`` here, so that no layer sees them as unexpected keys; with
    ``values``, after :func:`replace_wrap.io.verify.mismatch` compared them (``assign``: the load's
    ``assign=``).
    """
    sites = _sites(model)
    keys = {p: _keys(b, p, s, prefix) for p, (b, s) in sites.items()}
    own = [k for p in sites for k in keys[p] if k in state]
    name, ours = type(model).__name__, sorted(sites)
    if not own:  # no replaced tensors (a partial dict, or plain_state_dict=False): check a full one's scalars
        full = bool(sites) and _replaced_in(state, model, prefix) == ours
        problem = _other_options(sites, state, prefix, name, partial=_lacks_own_keys(model, state, prefix)) if full else None
        return StateDictError(problem) if problem else None
    theirs = _replaced_in(state, model, prefix)
    if theirs == ours:
        problem = _other_options(sites, state, prefix, name)
        if problem:
            return StateDictError(problem)
        # the names and shapes fit; the values must too, or the load gives another model than the one saved
        wrong = verify.mismatch(model, state, prefix, assign=assign) if values else None
        if wrong is None:
            for k in own:
                del state[k]
        return wrong
    blocks = sorted({p for p in sites if any(k in state for k in keys[p])})
    hatch = (
        " To load the other tensors and drop those on purpose: replace_wrap.load_state_dict(model, state_dict, "
        "strict=False)."
    )
    if not theirs:
        return StateDictError(
            f"this state dict does not fit the converted {name}: it holds tensors for the replaced blocks "
            f"{blocks} (e.g. {own[0]!r}), which synthesize theirs, and no scalars, so it was saved from an "
            "unconverted or merged model. Load it before converting (model.load_state_dict(state_dict), then "
            "replace_wrap.convert(model, ...)), or merge this model first (replace_wrap.merge(model))." + hatch
        )
    return StateDictError(
        f"this state dict was saved from a model converted differently: it replaced blocks {theirs}, this "
        f"{name} replaced {ours}. Load it into a fresh model converted the same way (replace_wrap.convert(model, "
        f"policy=replace_wrap.Paths({theirs}), <the original options>)), or save and load with replace_wrap.save "
        "and replace_wrap.load, which record the conversion." + hatch
    )


def _lacks_own_keys(model: nn.Module, state: Mapping[str, Any], prefix: str) -> bool:
    """Whether ``state`` lacks a tensor of ``model`` outside its replacement sites (a frozen parameter, a
    persistent buffer): then it is a partial state dict (the trainable parameters only), not a full one saved
    with other options. A dict that lacks only some sites' buffers is both, by its keys: it is refused."""
    for _, key, module in keyed_modules(model):
        if isinstance(module, ReplacementSite):
            continue
        at = f"{prefix}{key}." if key else prefix
        skip = module._non_persistent_buffers_set
        for key, t in (*module._parameters.items(), *module._buffers.items()):
            if t is not None and key not in skip and f"{at}{key}" not in state:
                return True
    return False


def _other_options(
    sites: dict[str, tuple[nn.Module, ReplacementSite]], state: Mapping[str, Any], prefix: str, name: str, partial: bool = False
) -> str | None:
    """Why ``state``, which holds the scalars of exactly these blocks, still does not fit: its sites' tensors
    differ in names or shapes (saved with other ``scalars``, ``rule`` or ``keep_original``). torch would copy
    every other tensor before raising about those, leaving a half-loaded model: this refuses first.

    ``partial``: ``state`` holds none of the replaced tensors' values, so it may be a partial state dict (the
    trainable parameters only, loaded with ``strict=False``): a site's buffers it lacks (``keep_original``'s
    originals, the ``ema`` rule's shadows) are left to torch's missing keys; its parameters must all be there.
    """
    def show(d: dict[str, tuple[int, ...]]) -> str:
        return ", ".join(f"{k}{list(v)}" for k, v in sorted(d.items())) or "none"

    for path, (_, site) in sites.items():
        at = f"{prefix}{path}.{SITE_ATTR}." if path else f"{prefix}{SITE_ATTR}."
        # what site.state_dict() writes, without running any state-dict hook
        ours = {k: tuple(v.shape) for k, v in site.named_parameters()}
        skip = site._non_persistent_buffers_set
        ours.update((k, tuple(v.shape)) for k, v in site.named_buffers() if k not in skip)
        theirs = {k[len(at):]: tuple(getattr(v, "shape", ())) for k, v in state.items() if k.startswith(at)}
        if partial:  # the buffers it holds must fit; those it lacks are missing keys, as for any partial dict
            params = {k for k, _ in site.named_parameters()}
            ours = {k: v for k, v in ours.items() if k in params or k in theirs}
        if theirs != ours:
            where = f"{path}.{SITE_ATTR}" if path else SITE_ATTR
            return (
                f"this state dict was saved from a model converted with other options: it holds "
                f"{show(theirs)} under {where!r}, where this converted {name} has {show(ours)} (another "
                "scalars=, rule= or keep_original=). Nothing was loaded. Load it into a fresh model "
                "converted with the checkpoint's options, or save and load with replace_wrap.save and "
                "replace_wrap.load (save_pretrained and replace_wrap.from_pretrained for Hugging Face "
                "models), which record them. A partial state dict of this very conversion (the trainable "
                "parameters only, without the blocks' buffers) loads with replace_wrap.load_state_dict(model, "
                "state_dict, strict=False)."
            )
    return None


def _keys(block: nn.Module, path: str, site: ReplacementSite, prefix: str) -> set[str]:
    """Keys under which ``state`` may hold the tensors of the replaced ``block`` (at key ``path``): the recorded
    paths, and where wrappers moved the layers since (PEFT's ``base_layer``)."""
    rels = {key_path(block, rel, tensor=True) for rel in site.tensor_names} | set(synthesized_keys(block))
    return {f"{prefix}{path}.{rel}" if path else f"{prefix}{rel}" for rel in rels}


def _replaced_in(state: Mapping[str, Any], model: nn.Module, prefix: str) -> list[str]:
    """Blocks of ``model`` for which ``state`` holds replacement scalars (``<block>.replacement.<name>``)."""
    modules = _by_key(model)
    marker = f".{SITE_ATTR}."
    found = set()
    for key in state:
        if not key.startswith(prefix) or marker not in f".{key[len(prefix):]}":
            continue
        block = f".{key[len(prefix):]}".rsplit(marker, 1)[0][1:]
        own = modules.get(f"{block}.{SITE_ATTR}" if block else SITE_ATTR)
        # a module of the user's that happens to be called "replacement" is not a site
        if block in modules and (own is None or isinstance(own, ReplacementSite)):
            found.add(block)
    return sorted(found)


def _sites(model: nn.Module) -> dict[str, tuple[nn.Module, ReplacementSite]]:
    """``{key: (block, site)}`` of the replaced blocks, by their state-dict keys: every path the guard compares
    with a state dict is a key (activation checkpointing's wrappers hide a segment, see analysis.wrappers)."""
    return {key_path(model, path): (block, site) for path, block, site in sites(model)}


def _by_key(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` by state-dict key; of a wrapper and the module it holds, the held one."""
    return {key: m for _, key, m in keyed_modules(model)}


def _parameter_keys(module: nn.Module, at: str) -> list[str]:
    """The state-dict keys of ``module``'s parameters, ``module`` being at key ``at``."""
    return [
        ".".join(p for p in (at, key, name) if p)
        for _, key, m in keyed_modules(module)
        for name, t in m._parameters.items()
        if t is not None
    ]


def converted(model: nn.Module) -> bool:
    """Whether ``model`` has replaced blocks."""
    return any(True for _ in sites(model))


def is_hf_config(cfg: object) -> bool:
    # Duck-typed PretrainedConfig: whatever it holds is written to config.json by save_pretrained.
    return cfg is not None and callable(getattr(cfg, "to_json_string", None)) and callable(
        getattr(cfg, "save_pretrained", None)
    )
