"""Saving and loading converted models: the conversion record, checkpoints, and the state-dict guard.

Why a record: the weights of a converted model cannot rebuild it on their own. Its state_dict lacks the
replaced blocks' tensors (they are synthesized) and holds the scalars instead, so loading it into a freshly
built model re-initialises those tensors without a word (Hugging Face ``from_pretrained`` reports them as
"newly initialized" and predicts differently). The conversion is therefore saved next to the weights as a
:class:`ConversionRecord` (the ``ReplaceConfig``, the exact replaced blocks with their neighbours and
synthesized tensors, the analysis route, versions). Loading builds the model, re-applies exactly that
conversion (a :class:`~replace_wrap.Paths` policy, checked block by block) and then loads the weights strictly.

Where the record lives (first match wins when reading):

1. ``replace_wrap.json`` next to the weights, written by :func:`save` (any ``nn.Module``);
2. the ``"replace_wrap"`` key of a Hugging Face ``config.json``: :func:`replace_wrap.convert` stores the record
   as ``model.config.replace_wrap``, so every ``save_pretrained`` (``Trainer.save_model``, Trainer checkpoints,
   ``push_to_hub``) carries it without a change to the training script; :func:`from_pretrained` reads it.
   :func:`replace_wrap.merge` removes it, so a merged model saves as a plain checkpoint.

The guard: ``convert`` registers a ``load_state_dict`` pre-hook on the converted model. Loading a state dict
that holds tensors for its replaced blocks (saved from an unconverted, merged or differently converted
model) raises :class:`~replace_wrap.StateDictError` before any tensor is copied, naming the blocks and the
fix. :func:`load_state_dict` gives the same clear error for the other direction (a converted state dict into a
model not yet converted) and, with ``strict=False``, loads past the guard on purpose.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from . import api
from .config import ReplaceConfig
from .errors import AlreadyConvertedError, ConfigError, PolicyError, StateDictError
from .hooks import SITE_ATTR, ReplacementSite
from .policy import Paths
from .report import ConversionReport

__all__ = ["ConversionRecord", "RecordedBlock", "from_pretrained", "load", "load_state_dict", "save"]

FORMAT = "replace_wrap.conversion"
FORMAT_VERSION = 1
RECORD_FILE = "replace_wrap.json"
SAFE_WEIGHTS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
CONFIG_KEY = "replace_wrap"  # key of the record in a Hugging Face config (and so in config.json)

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class RecordedBlock:
    """One replaced block of a saved conversion: its path, its neighbours and its synthesized tensors."""

    path: str
    prev: str
    next: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class ConversionRecord:
    """What :func:`replace_wrap.convert` did to a model, in a form that is saved as JSON and re-applied.

    Attributes:
        config: The conversion options.
        blocks: The replaced blocks, in report order.
        route: The analysis route of the original conversion (``"fx"``, ``"export"``, ``"structural"``).
        library_version: The replace_wrap version that wrote the record (informational).
        format_version: Version of this record's layout; newer versions are refused with a clear error.

    Example:
        >>> import torch, replace_wrap
        >>> def make():
        ...     return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])
        >>> record = ConversionRecord.of(replace_wrap.convert(make(), every=2))
        >>> [b.path for b in record.blocks]
        ['1', '3']
        >>> twin = record.apply(make())  # the same blocks replaced, with the same neighbours
        >>> [b.path for b in replace_wrap.report(twin).replaced]
        ['1', '3']
    """

    config: ReplaceConfig
    blocks: tuple[RecordedBlock, ...]
    route: str
    library_version: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.config, ReplaceConfig):
            raise ConfigError(f"ConversionRecord.config must be a ReplaceConfig, got {type(self.config).__name__}")
        if not self.blocks or not all(isinstance(b, RecordedBlock) for b in self.blocks):
            raise ConfigError("a ConversionRecord needs at least one RecordedBlock (a conversion replaces blocks)")

    @classmethod
    def of(cls, model: nn.Module) -> ConversionRecord:
        """The record of a converted model.

        Raises:
            NotConvertedError: If ``model`` was not converted.
        """
        return cls.from_report(api.report(model))

    @classmethod
    def from_report(cls, rep: ConversionReport) -> ConversionRecord:
        """The record of what a :class:`~replace_wrap.ConversionReport` replaced."""
        from . import __version__  # late: the package sets it after importing its modules

        blocks = tuple(RecordedBlock(b.path, b.prev or "", b.next or "", tuple(b.fused)) for b in rep.replaced)
        return cls(rep.config, blocks, rep.route, __version__)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (what is written to ``replace_wrap.json`` and ``config.json``)."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "library_version": self.library_version,
            "route": self.route,
            "config": self.config.to_dict(),
            "blocks": [dataclasses.asdict(b) | {"tensors": list(b.tensors)} for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConversionRecord:
        """Inverse of :meth:`to_dict`, validated.

        Raises:
            ConfigError: If ``data`` is no replace_wrap record, or one of a newer format version.
        """
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ConfigError(
                f"not a replace_wrap conversion record (expected 'format': {FORMAT!r}): {data!r:.200}"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"conversion record format_version {version!r} is not supported by this replace_wrap (reads "
                f"{FORMAT_VERSION}; the record was written by replace_wrap {data.get('library_version')!r}); "
                "upgrade replace_wrap to read it"
            )
        try:
            blocks = tuple(
                RecordedBlock(str(b["path"]), str(b["prev"]), str(b["next"]), tuple(map(str, b["tensors"])))
                for b in data["blocks"]
            )
            config = ReplaceConfig.from_dict(dict(data["config"]))
            return cls(config, blocks, str(data["route"]), str(data.get("library_version", "")), version)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed conversion record: missing or invalid field {exc}") from None

    def policy(self) -> Paths:
        """A policy that selects exactly the recorded blocks."""
        return Paths([b.path for b in self.blocks])

    def apply(self, model: M, example_inputs: Any = None) -> M:
        """Convert ``model`` (of the saved architecture, not yet converted) exactly as recorded; return it.

        The plan is checked block by block before anything changes: each recorded block must be replaceable
        with the recorded neighbours and tensors.

        Args:
            model: A freshly built model of the architecture the record was saved from.
            example_inputs: Inputs for the ``torch.export`` analysis route, if the original conversion used it.

        Raises:
            StateDictError: If the model's blocks do not match the record (the model is left unchanged).
            AlreadyConvertedError: If ``model`` is already converted.
        """
        options = {"policy": self.policy(), "config": self.config, "example_inputs": example_inputs}
        # a structural original stays structural: a graph could order the blocks differently
        options["trace"] = self.route != "structural"
        name = type(model).__name__
        try:
            planned = api.plan(model, **options)
        except PolicyError as exc:
            raise StateDictError(f"cannot re-apply the saved conversion to {name}: {exc}") from None
        got = {b.path: b for b in planned.blocks}
        for want in self.blocks:
            b = got[want.path]  # Paths guarantees the block exists
            if b.status != "replaced":
                raise StateDictError(
                    f"cannot re-apply the saved conversion to {name}: block {want.path!r} would be {b.status} "
                    f"({b.reason}). Is this the architecture the checkpoint was saved from?"
                )
            if (b.prev, b.next, tuple(b.fused)) != (want.prev, want.next, want.tensors):
                raise StateDictError(
                    f"cannot re-apply the saved conversion to {name}: block {want.path!r} was synthesized from "
                    f"{want.prev!r} and {want.next!r} ({len(want.tensors)} tensors) when saved, but this model's "
                    f"analysis ({planned.route}, saved: {self.route}) gives {b.prev!r} and {b.next!r} "
                    f"({len(b.fused)} tensors). Pass the example_inputs= of the original conversion, or check "
                    "that the model is built with the same configuration."
                )
        return api.convert(model, **options)

    def same_conversion(self, other: ConversionRecord) -> bool:
        """Whether ``other`` replaces the same blocks from the same neighbours with the same options."""
        return (self.config, self.blocks) == (other.config, other.blocks)


# --- directories ------------------------------------------------------------------------------------------


def save(model: nn.Module, directory: str | Path, *, safe_serialization: bool = True) -> Path:
    """Save a converted model's weights and its :class:`ConversionRecord` in ``directory``.

    Writes ``replace_wrap.json`` and ``model.safetensors`` (or ``pytorch_model.bin`` with
    ``safe_serialization=False``). Tensors that share memory (tied weights) are written as separate copies,
    which safetensors requires. Hugging Face models can use ``model.save_pretrained`` instead: the record
    travels in ``config.json``; reload those with :func:`from_pretrained`.

    Args:
        model: A converted model.
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
            exactly as recorded.
        directory: What :func:`save` wrote.
        strict: Passed to ``load_state_dict``.
        example_inputs: Inputs for the ``torch.export`` analysis route, if the original conversion used it.

    Returns:
        ``model``, converted and loaded: it predicts exactly as the saved model did.

    Raises:
        StateDictError: If the directory holds no record or weights, or the model does not fit them.
    """
    d = Path(directory)
    if not (d / RECORD_FILE).is_file() and _config_record(d) is not None:
        raise StateDictError(
            f"{d} was written by save_pretrained (the conversion record is in config.json): load it with "
            "replace_wrap.from_pretrained(ModelClass, directory)"
        )
    record = read_record(d)
    state = _read_weights(d)
    if _converted(model):
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
    return model


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
    want_info = kwargs.pop("output_loading_info", False)
    sub = _converting_subclass(cls, record, example_inputs)
    model, info = sub.from_pretrained(d, output_loading_info=True, **kwargs)
    if type(model) is sub:
        model.__class__ = cls  # the subclass only hooked construction; the model is a plain cls again
    missing = [k for k in info.get("missing_keys", ()) if f".{SITE_ATTR}." in f".{k}"]
    if missing:
        raise StateDictError(
            f"the checkpoint in {d} lacks the scalars {sorted(missing)[:4]} of its replaced blocks, although its "
            "config.json records a conversion: it was not saved from the converted model"
        )
    return (model, info) if want_info else model


def read_record(directory: str | Path) -> ConversionRecord:
    """The :class:`ConversionRecord` saved in ``directory`` (``replace_wrap.json``, else ``config.json``).

    Raises:
        StateDictError: If there is none.
    """
    d = Path(directory)
    if (d / RECORD_FILE).is_file():
        return ConversionRecord.from_dict(json.loads((d / RECORD_FILE).read_text()))
    data = _config_record(d)
    if data is not None:
        return ConversionRecord.from_dict(data)
    raise StateDictError(
        f"{d} holds no replace_wrap conversion record (no {RECORD_FILE}, no {CONFIG_KEY!r} key in config.json): "
        "it was not saved from a converted model. A plain or merged checkpoint loads the usual way "
        "(load_state_dict, cls.from_pretrained)."
    )


# --- state dicts ------------------------------------------------------------------------------------------


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """``model.load_state_dict(state_dict, strict)`` that explains converted/unconverted mismatches.

    A converted model refuses, by itself, a state dict that holds tensors for its replaced blocks (``convert``
    registers a guard). This function adds the other direction, a state dict saved from a converted model
    loaded into a model that is not converted yet, and with ``strict=False`` it is the deliberate way past
    the guard: the replaced blocks' tensors are then dropped and listed as unexpected keys.

    Returns:
        What ``nn.Module.load_state_dict`` returns (missing and unexpected keys).

    Raises:
        StateDictError: With ``strict=True``, if ``state_dict`` comes from a converted model and ``model`` is
            not converted (the message names the blocks to convert first), or the reverse.

    Example:
        >>> import torch, replace_wrap
        >>> def make():
        ...     return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])
        >>> sd = replace_wrap.convert(make(), every=2).state_dict()
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
    if not _converted(model):
        theirs = _replaced_in(state_dict, model, "")
        if theirs:
            raise StateDictError(
                f"this state dict was saved from a converted model (replaced blocks {theirs}), but this "
                f"{type(model).__name__} is not converted. Convert it first, the same way: "
                f"replace_wrap.convert(model, policy=replace_wrap.Paths({theirs}), <the original options>), then "
                "load. replace_wrap.save/load and save_pretrained/replace_wrap.from_pretrained record the "
                "conversion and do both."
            )
    return model.load_state_dict(state_dict, strict=True)


def attach(model: nn.Module, rep: ConversionReport) -> Callable[[], None]:
    """Called by ``convert``: install the state-dict guard and the Hugging Face config record; return the undo."""
    model.register_load_state_dict_pre_hook(_guard)
    cfg = getattr(model, "config", None)
    if not _is_hf_config(cfg):
        return lambda: detach(model)
    previous = cfg.__dict__.get(CONFIG_KEY, _MISSING)
    setattr(cfg, CONFIG_KEY, ConversionRecord.from_report(rep).to_dict())

    def undo() -> None:
        detach(model)
        if previous is not _MISSING:
            setattr(cfg, CONFIG_KEY, previous)

    return undo


def detach(model: nn.Module) -> None:
    """Called by ``merge``/``revert``: remove what :func:`attach` installed."""
    hooks = model._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _guard]:
        del hooks[key]
    cfg = getattr(model, "config", None)
    if _is_hf_config(cfg) and CONFIG_KEY in cfg.__dict__:
        delattr(cfg, CONFIG_KEY)


_MISSING = object()


def _guard(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    # The converted module's pre-hooks run before it or any child copies a tensor, so refusing here leaves
    # the model untouched. torch passes strict=True to every pre-hook whatever the caller asked, so the guard
    # cannot tell strict=False apart: it refuses only the unmistakable case (tensors for blocks that have
    # none), and load_state_dict(..., strict=False) below is the deliberate way to drop them.
    if not _GUARD_OFF.get():
        problem = _mismatch(module, state_dict, prefix)
        if problem:
            raise StateDictError(problem)


_GUARD_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("replace_wrap_guard_off", default=False)


def _mismatch(model: nn.Module, state: Mapping[str, Any], prefix: str) -> str | None:
    """Why ``state`` cannot be loaded into the converted ``model``: it holds tensors of replaced blocks."""
    sites = _sites(model)
    own = [k for p, s in sites.items() for rel in s.tensor_names if (k := f"{prefix}{p}.{rel}") in state]
    if not own:
        return None
    name, ours = type(model).__name__, sorted(sites)
    blocks = sorted({p for p, s in sites.items() if any(f"{prefix}{p}.{rel}" in state for rel in s.tensor_names)})
    theirs = _replaced_in(state, model, prefix)
    hatch = (
        " To load the other tensors and drop those on purpose: replace_wrap.load_state_dict(model, state_dict, "
        "strict=False)."
    )
    if not theirs:
        return (
            f"this state dict does not fit the converted {name}: it holds tensors for the replaced blocks "
            f"{blocks} (e.g. {own[0]!r}), which synthesize theirs, and no scalars, so it was saved from an "
            "unconverted or merged model. Load it before converting (model.load_state_dict(state_dict), then "
            "replace_wrap.convert(model, ...)), or merge this model first (replace_wrap.merge(model))." + hatch
        )
    return (
        f"this state dict was saved from a model converted differently: it replaced blocks {theirs}, this "
        f"{name} replaced {ours}. Load it into a fresh model converted the same way (replace_wrap.convert(model, "
        f"policy=replace_wrap.Paths({theirs}), <the original options>)), or save and load with replace_wrap.save "
        "and replace_wrap.load, which record the conversion." + hatch
    )


def _replaced_in(state: Mapping[str, Any], model: nn.Module, prefix: str) -> list[str]:
    """Blocks of ``model`` for which ``state`` holds replacement scalars (``<block>.replacement.<name>``)."""
    modules = dict(model.named_modules())
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


def _sites(model: nn.Module) -> dict[str, ReplacementSite]:
    return {
        path: site
        for path, m in model.named_modules()
        if isinstance(site := m._modules.get(SITE_ATTR), ReplacementSite)
    }


def _converted(model: nn.Module) -> bool:
    return bool(_sites(model))


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


def _config_record(d: Path) -> dict[str, Any] | None:
    cfg = d / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text()).get(CONFIG_KEY)
    return data if isinstance(data, dict) else None


def _is_hf_config(cfg: object) -> bool:
    # Duck-typed PretrainedConfig: whatever it holds is written to config.json by save_pretrained.
    return cfg is not None and callable(getattr(cfg, "to_json_string", None)) and callable(
        getattr(cfg, "save_pretrained", None)
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
        if _converted(self):
            raise AlreadyConvertedError(
                f"{cls.__name__}.__init__ already converted the model; cannot apply the saved conversion on top"
            )
        record.apply(self, example_inputs)

    namespace = {"__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), namespace)

