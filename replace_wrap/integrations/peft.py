"""PEFT (LoRA and the other tuners) on a converted model: convert first, then :func:`get_peft_model`.

The recipe ("replace the middle, LoRA the rest")::

    replace_wrap.convert(model, every=2)                     # the replaced blocks' weights are synthesized
    model = replace_wrap.integrations.peft.get_peft_model(model, LoraConfig(target_modules=[...]))
    ...                                                       # train: LoRA matrices and the scalars a, b learn
    model.save_pretrained("adapter")                          # LoRA + scalars + the replaced tensors' values
    model = replace_wrap.integrations.peft.from_pretrained(build_base(), "adapter")   # exact
    merged = model.merge_and_unload()                         # a plain model, exact

Why the order: ``peft.get_peft_model`` freezes every parameter that is not an adapter's (the scalars too),
and PEFT's own calls know nothing of replaced layers. :func:`get_peft_model` (or :func:`prepare` on what
``peft.get_peft_model`` returned) makes PEFT's calls exact on a converted model:

- the scalars train (PEFT froze them);
- ``merge_and_unload()`` first materializes the replaced blocks (``replace_wrap.merge``): merging LoRA into the
  neighbours' weights would otherwise change the replaced blocks, which read them, and a LoRA delta merged into
  a synthesized weight would be lost;
- ``merge_adapter()`` (reversible merge) refuses while blocks are replaced, for the same reason;
- ``modules_to_save`` may name only modules outside the replaced blocks (:mod:`.peft_wrapping` says why);
- ``save_pretrained`` also writes the scalars, the replaced tensors' synthesized values and the conversion
  record (``replace_wrap.json``) into the adapter, so ``PeftModel.from_pretrained`` on a plain base model gives
  the plain model that predicts the same, and :func:`from_pretrained` rebuilds the converted one.

A PEFT model around a converted model that was not prepared refuses its first forward and every state-dict
load with :class:`~replace_wrap.IntegrationError`, and ``convert`` refuses a model that already holds PEFT
layers (the other order would synthesize the replaced blocks' LoRA matrices from the neighbours', which PEFT's
save and merge cannot represent).

This module imports ``peft`` only when one of its functions is called.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..analysis.wrappers import hides, key_path
from ..errors import IntegrationError, NotConvertedError, StateDictError
from ..report import ConversionReport, converted_module
from ..surgery.apply import located_tensors, sites
from ..surgery.attachments import register_attachment
from ..surgery.site import SITE_ATTR, ReplacementSite
from ..io.record import RECORD_FILE, ConversionRecord, read_record
from .peft_wrapping import (
    SCALARS_WRAPPED, matched_paths, refuse_modules_to_save, refuse_wrapped, replaced_blocks, saved_modules_to_save,
)

__all__ = ["from_pretrained", "get_peft_model", "prepare"]

PREPARED_ATTR = "_replace_wrap_peft_prepared"  # set on the converted module by prepare()
_ALLOW_LOAD: ContextVar[bool] = ContextVar("replace_wrap_peft_allow_load", default=False)
_RECIPE = (
    "Use replace_wrap.integrations.peft.get_peft_model(model, config) instead of peft.get_peft_model, or call "
    "replace_wrap.integrations.peft.prepare(peft_model) on the PeftModel; load saved adapters with "
    "replace_wrap.integrations.peft.from_pretrained(base_model, directory)."
)


def get_peft_model(model: nn.Module, peft_config: Any, **kwargs: Any) -> nn.Module:
    """``peft.get_peft_model`` for a converted model, followed by :func:`prepare`.

    Args:
        model: A converted model (``replace_wrap.convert`` first).
        peft_config: A PEFT config, e.g. ``LoraConfig(target_modules=["q_proj", "v_proj"])``.
        **kwargs: Passed to ``peft.get_peft_model``.

    Raises:
        NotConvertedError: If ``model`` is not converted (use ``peft.get_peft_model`` for a plain model).
    """
    if converted_module(model) is None:
        raise NotConvertedError(
            f"{type(model).__name__} is not converted: replace_wrap.convert(model, ...) first, then this function "
            "(for a plain model, peft.get_peft_model is all you need)"
        )
    refuse_modules_to_save(model, peft_config, "base_model.model")  # before PEFT touches the model
    import peft

    return prepare(peft.get_peft_model(model, peft_config, **kwargs))


def prepare(peft_model: nn.Module, *, train_scalars: bool = True) -> nn.Module:
    """Make a ``PeftModel`` that wraps a converted model exact under PEFT's calls (see the module docstring).

    Args:
        peft_model: What ``peft.get_peft_model`` (or ``PeftModel.from_pretrained``) returned for a converted model.
        train_scalars: Make every replaced block's scalars trainable again (PEFT froze them).

    Returns:
        ``peft_model``, prepared in place.

    Raises:
        NotConvertedError: If the model inside ``peft_model`` is not converted.
        IntegrationError: If ``peft_model`` is no PEFT model, or ``modules_to_save`` wrapped the scalars
            (``"replacement"``: PEFT would train a copy that the replaced blocks never read) or another module
            of a replaced block (its copy would have no weights of its own); ``peft_model`` is left as it was.
    """
    tuner = getattr(peft_model, "base_model", None)
    if not (hasattr(peft_model, "peft_config") and hasattr(tuner, "_unload_and_optionally_merge")):
        raise IntegrationError(
            f"prepare needs the PeftModel returned by peft.get_peft_model, got {type(peft_model).__name__}"
        )
    holder = converted_module(peft_model)
    if holder is None:
        raise NotConvertedError(f"the model inside this {type(peft_model).__name__} is not converted")
    left = "The PEFT model was left unprepared."
    for path, module in peft_model.named_modules():
        if isinstance(getattr(module, "original_module", None), ReplacementSite):
            raise IntegrationError(SCALARS_WRAPPED.format(path=path, left=left))
    wrapped = [path for path, module in peft_model.named_modules() if hasattr(module, "original_module")]
    refuse_wrapped(wrapped, replaced_blocks(peft_model), left)
    if train_scalars:
        for _, _, site in sites(peft_model):
            site.requires_grad_(True)
    peft_model.__class__ = _subclass(type(peft_model), _PreparedPeftModel)
    tuner.__class__ = _subclass(type(tuner), _PreparedTuner)
    object.__setattr__(holder, PREPARED_ATTR, True)
    return peft_model


def from_pretrained(model: nn.Module, directory: str | Path, *, is_trainable: bool = False, **kwargs: Any) -> nn.Module:
    """Load an adapter saved from a prepared PEFT model onto ``model``: convert it as recorded, load, prepare.

    Args:
        model: The base model, freshly built (unconverted) or already converted as recorded.
        directory: What ``save_pretrained`` of a prepared PEFT model wrote.
        is_trainable: Passed to ``PeftModel.from_pretrained``; also makes the scalars trainable.
        **kwargs: Passed to ``PeftModel.from_pretrained``.

    Returns:
        The prepared ``PeftModel``, predicting exactly as the saved one.

    Raises:
        StateDictError: If ``directory`` has no conversion record, or its adapter lacks the scalars (it was saved
            by a PEFT model that was not prepared).
    """
    import peft

    d = Path(directory)
    record = read_record(d)
    wrapped = matched_paths(model, saved_modules_to_save(d), "base_model.model")  # before converting the model
    refuse_wrapped(wrapped, {b.path: b.prev for b in record.blocks}, "The model was left unchanged.")
    holder = converted_module(model)
    if holder is None:
        record.apply(model)
    elif not ConversionRecord.of(holder).same_conversion(record):
        raise StateDictError(f"{type(model).__name__} is converted differently from the adapter in {d}")
    wanted = {f"base_model.model.{key_path(model, b.path)}.{SITE_ATTR}." for b in record.blocks}
    saved = _adapter_keys(d)
    if saved is not None and not all(any(k.startswith(w) for k in saved) for w in wanted):
        raise StateDictError(
            f"the adapter in {d} holds no scalars of the replaced blocks {[b.path for b in record.blocks]}: it was "
            "saved by a PEFT model that was not prepared. " + _RECIPE
        )
    token = _ALLOW_LOAD.set(True)
    try:
        peft_model = peft.PeftModel.from_pretrained(model, d, is_trainable=is_trainable, **kwargs)
    finally:
        _ALLOW_LOAD.reset(token)
    return prepare(peft_model, train_scalars=is_trainable)


# --- what prepare() installs -------------------------------------------------------------------------------


class _PreparedTuner:
    """Mixed into PEFT's tuner (``LoraModel``, ...): merges are exact on a converted model."""

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> Any:
        if merge and converted_module(self.model) is not None:
            api.merge(self.model)  # the replaced blocks become plain before LoRA moves their neighbours
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> Any:
        if converted_module(self.model) is not None:
            raise IntegrationError(
                "merge_adapter() would fold LoRA into weights that the replaced blocks read, changing them. Call "
                "replace_wrap.merge(peft_model) first (the replaced blocks become plain; then merge_adapter and "
                "unmerge_adapter work), or merge_and_unload(), which does both."
            )
        return super().merge_adapter(*args, **kwargs)


class _PreparedPeftModel:
    """Mixed into ``PeftModel``: ``save_pretrained`` also writes the conversion (see :func:`_add_conversion`);
    ``add_adapter`` (also what ``load_adapter`` calls) checks ``modules_to_save`` first."""

    def add_adapter(self, adapter_name: str, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        refuse_modules_to_save(self, peft_config, "")
        return super().add_adapter(adapter_name, peft_config, *args, **kwargs)

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        out = super().save_pretrained(save_directory, *args, **kwargs)
        holder = converted_module(self)
        if holder is not None and kwargs.get("is_main_process", True):
            names = kwargs.get("selected_adapters") or list(self.peft_config)
            for name in names:
                d = Path(save_directory) if name == "default" else Path(save_directory) / name
                _add_conversion(self, holder, d, name)
        return out


def _add_conversion(peft_model: nn.Module, holder: nn.Module, d: Path, adapter: str) -> None:
    """Add the scalars and the synthesized tensors to ``adapter``'s file, under the keys that PEFT's loader of
    that adapter alone looks up (see :func:`_key_for_adapter`); write the record."""
    extra: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for path, block, site in sites(peft_model):
            at = key_path(peft_model, path)  # the state-dict key (activation checkpointing hides a segment)
            extra.update({f"{at}.{SITE_ATTR}.{k}": v.detach() for k, v in site.state_dict().items()})
            for key, layer, name in located_tensors(block, site):
                extra[_key_for_adapter(peft_model, f"{path}.{key}", adapter)] = getattr(layer, name).detach()
    safe = d / "adapter_model.safetensors"
    if safe.is_file():
        from safetensors.torch import load_file, save_file

        state = load_file(str(safe)) | {k: v.contiguous().cpu() for k, v in extra.items()}
        save_file(state, str(safe), metadata={"format": "pt"})
    else:
        path = d / "adapter_model.bin"
        state = torch.load(path, map_location="cpu", weights_only=True) | {k: v.cpu() for k, v in extra.items()}
        torch.save(state, path)
    (d / RECORD_FILE).write_text(_record_json(holder))


def _key_for_adapter(peft_model: nn.Module, key: str, adapter: str) -> str:
    """``key`` (of the live ``peft_model``) as a model holding only ``adapter`` names it.

    A tuner layer exists in the live model if any of its adapters targets the layer, but PEFT's loader of one
    adapter wraps only that adapter's targets: where the live key passes through the ``base_layer`` of a tuner
    layer that does not hold ``adapter`` (e.g. ``v_proj.base_layer.weight`` under another adapter's LoRA), the
    loader's model has the plain layer (``v_proj.weight``). Under the live key PEFT would skip the tensor
    silently (it loads with ``strict=False``) and the layer would keep the base model's value.
    """
    parts = key.split(".")
    kept: list[str] = []
    module = peft_model
    for i, part in enumerate(parts):
        if hides(module, part):  # a wrapper's held module: no segment of the key (analysis.wrappers)
            module = module._modules[part]
            continue
        names = getattr(module, "adapter_layer_names", None)  # a PEFT tuner layer (BaseTunerLayer)
        if part == "base_layer" and names is not None and not any(adapter in getattr(module, n, ()) for n in names):
            module = module.get_submodule(part)
            continue
        kept.append(part)
        if i < len(parts) - 1:
            module = module.get_submodule(part)
    return ".".join(kept)


def _record_json(holder: nn.Module) -> str:
    import json

    return json.dumps(ConversionRecord.of(holder).to_dict(), indent=2) + "\n"


def _adapter_keys(d: Path) -> list[str] | None:
    safe = d / "adapter_model.safetensors"
    if not safe.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(safe), framework="pt") as f:
        return list(f.keys())


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type) -> type:
    if issubclass(base, mixin):
        return base
    cls = _SUBCLASSES.get((base, mixin))
    if cls is None:
        # Same name and qualname: pickle finds the base class under that name, sees another object and refuses
        # loudly instead of silently dropping the mixin (deepcopy works).
        cls = type(base.__name__, (mixin, base), {"__module__": base.__module__})
        _SUBCLASSES[(base, mixin)] = cls
    return cls


# --- the attachment: refuse PEFT calls that would not give the trained function ---------------------------


def _peft_types() -> tuple[type, ...]:
    peft = sys.modules.get("peft")  # a model holding PEFT layers means peft is imported
    if peft is None:
        return ()
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (BaseTunerLayer, peft.PeftModel)


def _raw(holder: nn.Module) -> bool:
    return "peft_config" in holder.__dict__ and not holder.__dict__.get(PREPARED_ATTR, False)


def _refuse_raw_forward(module: nn.Module, args: Any) -> None:
    if _raw(module):
        raise IntegrationError(
            f"this converted {type(module).__name__} is wrapped by peft.get_peft_model, which froze the scalars and "
            "whose merge_and_unload and save_pretrained would not give the trained function. " + _RECIPE
        )


def _refuse_raw_load(module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
    if _raw(module) and not _ALLOW_LOAD.get():
        raise IntegrationError(
            f"loading into a converted {type(module).__name__} wrapped by PEFT that was not prepared: a PEFT "
            "adapter saved that way lacks the scalars of the replaced blocks. " + _RECIPE
        )


def _detach(model: nn.Module) -> None:
    for hooks, fn in ((model._forward_pre_hooks, _refuse_raw_forward), (model._load_state_dict_pre_hooks, _refuse_raw_load)):
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is fn]:
            del hooks[key]
    model.__dict__.pop(PREPARED_ATTR, None)


@register_attachment("peft", detach=_detach)
def _attach(model: nn.Module, report: ConversionReport) -> None:
    types = _peft_types()
    found = next((path for path, m in model.named_modules() if types and isinstance(m, types)), None)
    if found is not None:
        raise IntegrationError(
            f"{type(model).__name__} already holds PEFT layers ({found or 'the model itself'!r}): convert the base "
            "model first, then add the adapters: replace_wrap.convert(base, ...); "
            "replace_wrap.integrations.peft.get_peft_model(base, config). The model was left unchanged."
        )
    model.register_forward_pre_hook(_refuse_raw_forward)
    model.register_load_state_dict_pre_hook(_refuse_raw_load)
