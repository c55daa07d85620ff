"""Checkpoints of converted models: :func:`save` / :func:`load` for any module, :func:`from_pretrained` for HF.

Each writes or reads the weights together with the :class:`~replace_wrap.ConversionRecord`
(:mod:`replace_wrap.io.record`), so loading rebuilds exactly the converted model that was saved: the record
is applied to a freshly built model first, then its weights are loaded strictly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..analysis.wrappers import held_model
from ..errors import AlreadyConvertedError, CompatibilityError, ConfigError, StateDictError
from ..surgery.site import SITE_ATTR
from . import verify
from .guard import converted
from .plain import converted_only, synthesized_paths
from .record import RECORD_FILE, ConversionRecord, config_record, read_record

__all__ = ["from_pretrained", "load", "read_tensors", "save"]

SAFE_WEIGHTS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
SAFE_INDEX_FILE, TORCH_INDEX_FILE = f"{SAFE_WEIGHTS_FILE}.index.json", f"{TORCH_WEIGHTS_FILE}.index.json"

M = TypeVar("M", bound=nn.Module)


def save(model: nn.Module, directory: str | Path, *, safe_serialization: bool = True) -> Path:
    """Save a converted model's weights and its :class:`ConversionRecord` in ``directory``.

    Writes ``replace_wrap.json`` and ``model.safetensors`` (or ``pytorch_model.bin`` with
    ``safe_serialization=False``). Tensors that share memory (tied weights) are written as separate copies,
    which safetensors requires. Hugging Face models can use ``model.save_pretrained`` instead: the record
    travels in ``config.json``; reload those with :func:`from_pretrained`.

    Args:
        model: A converted model; wrapped by ``torch.compile`` or (Distributed)DataParallel, the model inside is
            saved (its keys and block paths, without ``_orig_mod.`` or ``module.``).
        directory: Created if missing.
        safe_serialization: Write safetensors (default) or a ``torch.save`` file.

    Returns:
        The directory.

    Raises:
        NotConvertedError: If ``model`` is not converted (save a plain model the usual way).

    Example:
        >>> import tempfile, torch, replace_wrap
        >>> def make():
        ...     return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])
        >>> net = replace_wrap.convert(make(), every=2)
        >>> path = replace_wrap.save(net, tempfile.mkdtemp())
        >>> twin = replace_wrap.load(make(), path)
        >>> torch.equal(twin[1].weight, net[1].weight)
        True
    """
    model = held_model(model)  # the checkpoint of the model, not of the wrapper: its keys and paths load anywhere
    record = ConversionRecord.of(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = _unshared(model.state_dict())
    if safe_serialization:
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ConfigError(
                "safe_serialization=True needs the safetensors package (pip install safetensors, or "
                "replace-wrap[hf]); or pass safe_serialization=False to write a torch.save file"
            ) from None
        save_file(state, str(out / SAFE_WEIGHTS_FILE), metadata={"format": "pt"})
    else:
        torch.save(state, out / TORCH_WEIGHTS_FILE)
    (out / RECORD_FILE).write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return out


def load(model: M, directory: str | Path, *, strict: bool = True, example_inputs: Any = None) -> M:
    """Rebuild a model saved with :func:`save`: apply the saved conversion to ``model``, then load the weights.

    Args:
        model: A freshly built model of the saved architecture (unconverted), or one already converted
            exactly as recorded; wrapped by ``torch.compile`` or (Distributed)DataParallel, the model inside
            is loaded (``model`` is returned).
        directory: What :func:`save` wrote.
        strict: Passed to ``load_state_dict``.
        example_inputs: Inputs for the ``torch.export`` analysis route, if the original conversion used it.

    Returns:
        ``model``, converted and loaded: it predicts exactly as the saved model did.

    Raises:
        StateDictError: If the directory holds no record or weights, or the model does not fit them.
    """
    d = Path(directory)
    if not (d / RECORD_FILE).is_file() and config_record(d) is not None:
        raise StateDictError(
            f"{d} was written by save_pretrained (the conversion record is in config.json): load it with "
            "replace_wrap.from_pretrained(ModelClass, directory)"
        )
    record = read_record(d)
    state = _read_weights(d)
    # a checkpoint that save wrote from the wrapper itself (before it saved the model inside) names the wrapper's
    # class and prefixed paths: it loads into the same wrapper, as it did
    wrapper, model = model, (model if type(model).__name__ == record.module else held_model(model))
    if converted(model):
        mine = ConversionRecord.of(model)
        if not mine.same_conversion(record):
            raise StateDictError(
                f"{type(model).__name__} is already converted, differently from the checkpoint in {d} (it "
                f"replaced {[b.path for b in mine.blocks]}, the checkpoint {[b.path for b in record.blocks]}); "
                "pass a freshly built, unconverted model"
            )
    else:
        record.apply(model, example_inputs)
    model.load_state_dict(state, strict=strict)
    return wrapper


def from_pretrained(cls: type[M], directory: str | Path, *, example_inputs: Any = None, **kwargs: Any) -> M:
    """Load a converted Hugging Face model saved with ``save_pretrained`` (e.g. by ``Trainer.save_model``).

    The model is built by ``cls.from_pretrained(directory, **kwargs)`` and converted as recorded in its
    ``config.json`` right after construction, before the weights are read: Hugging Face then loads the
    converted state dict (scalars included) with all its own machinery (key renaming, dtype, device map), and
    reports no missing key.

    Args:
        cls: The model class, e.g. ``ViTForImageClassification``.
        directory: A local directory written by ``save_pretrained`` from a converted model.
        example_inputs: Inputs for the ``torch.export`` analysis route, if the original conversion used it.
        **kwargs: Passed to ``cls.from_pretrained`` (``dtype=``, ``device_map=``, ...).

    Returns:
        The converted model (an instance of ``cls``), predicting exactly as the saved one.

    Raises:
        StateDictError: If the directory holds no conversion record, or the checkpoint lacks the scalars.
        CompatibilityError: If ``device_map`` offloads modules (to "disk", or to the cpu next to an
            accelerator): a converted model cannot run offloaded; load the plain model instead.

    Example:
        >>> import tempfile, torch, replace_wrap
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> cfg = ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        ...                 image_size=8, patch_size=4)
        >>> model = replace_wrap.convert(ViTForImageClassification(cfg), every=2)
        >>> path = tempfile.mkdtemp()
        >>> model.save_pretrained(path)
        >>> twin = replace_wrap.from_pretrained(ViTForImageClassification, path)
        >>> [b.path for b in replace_wrap.report(twin).replaced]
        ['vit.layers.1']
    """
    d = Path(directory)
    if not d.is_dir():
        raise StateDictError(
            f"from_pretrained reads a local directory written by save_pretrained; {str(d)!r} is none (download a "
            "hub checkpoint first, e.g. huggingface_hub.snapshot_download)"
        )
    record = read_record(d)
    _refuse_offload(cls, d, kwargs.get("device_map"), [])  # an explicit map: refused before anything is read
    want_info = kwargs.pop("output_loading_info", False)
    sub = _converting_subclass(cls, record, example_inputs)
    # Hugging Face loads by the keys of the model's state dict: the converted model's own keys (scalars, no
    # replaced tensors). The checkpoint's synthesized values (written for plain loaders) are derived data;
    # the subclass lists them as keys to ignore, so they are neither loaded nor reported.
    with converted_only():
        model, info = sub.from_pretrained(d, output_loading_info=True, **kwargs)
    if type(model) is sub:
        model.__class__ = cls  # the subclass only hooked construction; the model is a plain cls again
        model.__dict__.pop("_keys_to_ignore_on_load_unexpected", None)  # post_init copied the subclass's list
    # "auto", "balanced", max_memory=...: what is offloaded is known once Hugging Face has placed the model
    _refuse_offload(cls, d, getattr(model, "hf_device_map", None), [n for n, p in model.named_parameters() if p.is_meta])
    extra = sorted(k for k in info.get("unexpected_keys", ()) if f".{SITE_ATTR}." in f".{k}")
    if extra:  # HF drops unexpected keys with a log line: those blocks would come back plain, silently
        raise StateDictError(
            f"the checkpoint in {d} holds scalars of replaced blocks that its config.json record does not convert "
            f"({extra[:4]}{f' and {len(extra) - 4} more' if len(extra) > 4 else ''}; the record converts "
            f"{[b.path for b in record.blocks][:4]} of a {record.module or cls.__name__}): it was saved from a "
            "model whose modules were converted separately (an encoder and a decoder sharing one config, whose "
            "record names the last conversion), so those blocks would load as plain layers. Convert the model in "
            "one call before training (replace_wrap.convert(model, policy=replace_wrap.Paths([...]))). To load "
            f"this checkpoint: the plain loader ({cls.__name__}.from_pretrained(directory)) gives the plain model "
            "that predicts the same; or build the model, convert each module as before, and load the checkpoint's "
            "weights into it (model.load_state_dict)."
        )
    missing = [k for k in info.get("missing_keys", ()) if f".{SITE_ATTR}." in f".{k}"]
    if missing:
        raise StateDictError(
            f"the checkpoint in {d} lacks the scalars {sorted(missing)[:4]} of its replaced blocks, although its "
            "config.json records a conversion: it was not saved from the converted model. A plain model loaded "
            "from a converted checkpoint (ModelClass.from_pretrained) keeps that record in its config, and saves "
            "plain weights under it. Load this checkpoint with the plain loader (ModelClass.from_pretrained"
            "(directory)) and convert it again if you want; del model.config.replace_wrap before saving a plain "
            "model drops the record."
        )
    # a head model's checkpoint in its base model: Hugging Face dropped base_model_prefix from the file's keys
    lead = f"{model.base_model_prefix}." if record.for_base_model(model) is not record else ""
    _verify_loaded(model, d, lead)  # Hugging Face ignored the synthesized values: compare them with what the model makes
    return (model, info) if want_info else model


def _verify_loaded(model: nn.Module, d: Path, lead: str = "") -> None:
    """Refuse a model whose replaced tensors differ from the synthesized values of its checkpoint (see
    :mod:`.verify`), read from the files for the keys the model has (behind ``lead`` there). Hugging Face renames
    keys between the checkpoint and the model (transformers 5's weight conversions); a key that only a converter
    maps (tensors fused or split on the way) is not compared."""
    keys = synthesized_paths(model)
    names = {k: lead + n for k, n in _checkpoint_names(model, keys).items()}
    found = read_tensors(d, names.values())
    saved = {k: found[n] for k, n in names.items() if n in found and tuple(found[n].shape) == keys[k]}
    unread = [k for k in keys if k not in saved]
    if unread:  # said, as verify says what it skips: a check that did not run must not pass for one that did
        verify.logger.info(
            "replace_wrap: the synthesized values of %d replaced tensors (e.g. %r) were not checked against their "
            "neighbours and scalars: %s holds none of that shape under a name Hugging Face maps to the tensor alone "
            "(a weight conversion fuses or splits it, as MoE experts; or saved with plain_state_dict=False)",
            len(unread), unread[0], d,
        )
    problem = verify.mismatch(model, saved, substitute=False, next_step=(
        "Hugging Face loaded it, and no model was returned. To get the model the saved values describe, load "
        f"the checkpoint with the plain loader ({type(model).__name__}.from_pretrained(directory): every "
        "checkpoint of a converted model is a plain one) and convert that again."
    ))
    if problem is not None:
        raise problem


def _checkpoint_names(model: nn.Module, keys: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """The checkpoint's name of each model key: transformers' reverse renaming (what ``save_pretrained``
    applies), asked key by key with a meta tensor; the key itself where transformers has none or converts it."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: checkpoints hold the model's own names
        return {k: k for k in keys}
    out = {}
    for key, shape in keys.items():
        t = torch.empty(shape, device="meta")
        try:
            renamed = revert_weight_conversion(model, {key: t})
        except Exception:  # a converter that needs its whole group of tensors: not a plain renaming
            continue
        if len(renamed) == 1 and next(iter(renamed.values())) is t:  # a renaming, the tensor untouched
            out[key] = next(iter(renamed))
    return out


def read_tensors(directory: str | Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors under ``keys`` in a checkpoint directory (safetensors or ``torch.save`` weights, one file or
    sharded with an index), each read alone (safetensors) or memory-mapped; keys it lacks are left out."""
    d, wanted = Path(directory), set(keys)
    by_file: dict[Path, list[str]] = {}
    for index, single in ((SAFE_INDEX_FILE, SAFE_WEIGHTS_FILE), (TORCH_INDEX_FILE, TORCH_WEIGHTS_FILE)):
        if (d / index).is_file():
            weight_map: dict[str, str] = json.loads((d / index).read_text(encoding="utf-8"))["weight_map"]
            for k in wanted & set(weight_map):
                by_file.setdefault(d / weight_map[k], []).append(k)
            break
        if (d / single).is_file():
            by_file[d / single] = sorted(wanted)
            break
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                held = set(f.keys())
                out.update((k, f.get_tensor(k)) for k in names if k in held)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            out.update((k, state[k]) for k in names if k in state)
    return out


def _offloaded(device_map: Any) -> list[str]:
    """Modules a device map offloads: "disk" entries, and "cpu" entries next to an accelerator (accelerate then
    keeps their weights on the cpu and moves them in for each forward through its hooks)."""
    if not isinstance(device_map, Mapping):
        return []  # "auto", "cpu", a device: nothing known before loading
    places = {k: str(v) for k, v in device_map.items()}
    accelerator = any(v not in ("cpu", "disk", "meta") for v in places.values())
    return [k for k, v in places.items() if v == "disk" or (accelerator and v == "cpu")]


def _refuse_offload(cls: type, d: Path, device_map: Any, meta: list[str]) -> None:
    # Offloading hooks keep a module's weights on the meta device until that module's own forward; a replaced
    # block reads its neighbours' weights outside their forward, so the converted model cannot run offloaded.
    offloaded = _offloaded(device_map) or meta
    if not offloaded:
        return
    raise CompatibilityError(
        f"replace_wrap.from_pretrained({cls.__name__}, {str(d)!r}) with this device_map offloads "
        f"{offloaded[:4]}{f' and {len(offloaded) - 4} more' if len(offloaded) > 4 else ''} (disk, or cpu next to "
        "an accelerator): a converted model cannot run offloaded, since accelerate keeps an offloaded module's "
        "weights on the meta device until its own forward and a replaced block reads its neighbours' weights "
        f"outside their forward. Load the checkpoint with the plain loader instead, {cls.__name__}.from_pretrained"
        "(directory, device_map=...): every checkpoint of a converted model is a plain one that predicts exactly "
        "the same, and it offloads (replace_wrap.merge gives that plain model from a converted one); or keep the "
        "whole model on real devices (no 'disk' entries or cpu offload; enough max_memory)."
    )


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own memory (safetensors refuses tensors that share memory)."""
    seen: set[tuple[Any, int]] = set()
    out = {}
    for k, t in state.items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        shared = key is not None and key in seen
        out[k] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
        if key is not None:
            seen.add(key)
    return out


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    if (d / SAFE_WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(d / SAFE_WEIGHTS_FILE))
    if (d / TORCH_WEIGHTS_FILE).is_file():
        return torch.load(d / TORCH_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise StateDictError(
        f"{d} holds no weights ({SAFE_WEIGHTS_FILE} or {TORCH_WEIGHTS_FILE}); was it written by replace_wrap.save?"
    )


def _converting_subclass(cls: type[M], record: ConversionRecord, example_inputs: Any) -> type[M]:
    """A subclass of ``cls`` that converts itself right after construction, before weights are loaded.

    ``from_pretrained`` builds the model with ``cls(config, ...)`` and then loads the checkpoint into its
    state dict, so the converted state dict (scalars, no replaced tensors) is what Hugging Face loads.
    """
    if not (isinstance(cls, type) and callable(getattr(cls, "from_pretrained", None))):
        raise ConfigError(f"from_pretrained needs a model class with a from_pretrained method, got {cls!r}")

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        if converted(self):
            raise AlreadyConvertedError(
                f"{cls.__name__}.__init__ already converted the model; cannot apply the saved conversion on top"
            )
        record.for_base_model(self).apply(self, example_inputs)

    synthesized = [f"{b.path}.{t}" if b.path else t for b in record.blocks for t in b.tensors]
    lead = f"{getattr(cls, 'base_model_prefix', '')}."
    # loaded into the base model, Hugging Face drops base_model_prefix from the keys; the patterns below match
    # a key's end, so the shorter key matches both
    synthesized = [k[len(lead):] if lead != "." and k.startswith(lead) else k for k in synthesized]
    ignore = list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ())
    ignore += [rf"(^|\.){re.escape(k)}$" for k in synthesized]
    namespace = {
        "__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "_keys_to_ignore_on_load_unexpected": ignore,
    }
    return type(cls.__name__, (cls,), namespace)
