"""The conversion record: what ``convert`` did to a model, saved as JSON next to its weights and re-applied.

Why a record: the weights of a converted model cannot rebuild it on their own. Its state_dict lacks the
replaced blocks' tensors (they are synthesized) and holds the scalars instead, so rebuilding the converted
model needs the conversion itself: the ``ReplaceConfig``, the exact replaced blocks with their neighbours and
synthesized tensors, the analysis route, versions. Re-applying a record is a :class:`~replace_wrap.Paths`
conversion checked block by block.

Where the record lives (first match wins when reading):

1. ``replace_wrap.json`` next to the weights, written by :func:`replace_wrap.save` (any ``nn.Module``);
2. the ``"replace_wrap"`` key of a Hugging Face ``config.json``: ``convert`` stores the record as
   ``model.config.replace_wrap`` (see :mod:`replace_wrap.io.guard`), so every ``save_pretrained``
   (``Trainer.save_model``, Trainer checkpoints, ``push_to_hub``) carries it; ``merge`` removes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from .. import api
from .._version import __version__
from ..analysis.wrappers import keyed_modules, recorded_key, unwrap
from ..config import UNFITTED_INIT, ReplaceConfig
from ..errors import CompatibilityError, ConfigError, PolicyError, StateDictError
from ..report import ConversionReport, converted_modules
from ..selection.policies import Paths
from ..surgery.fits import scalars_from_checkpoint

__all__ = ["CONFIG_KEY", "RECORD_FILE", "ConversionRecord", "RecordedBlock", "read_record"]

FORMAT = "replace_wrap.conversion"
FORMAT_VERSION = 1
RECORD_FILE = "replace_wrap.json"
CONFIG_KEY = "replace_wrap"  # key of the record in a Hugging Face config (and so in config.json)

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class RecordedBlock:
    """One replaced block of a saved conversion: its path, its neighbours and its synthesized tensors.

    Each is a state-dict key, as the weights saved with the record name it: without the segments that
    activation checkpointing's wrappers hide (see :mod:`replace_wrap.analysis.wrappers`), so that the record
    applies to the model with or without those wrappers, as its weights load into either.
    """

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
        module: Class name of the module that was converted, when the record was written by a module that
            lives inside the model that saves it (``convert(model.vit)`` of a Hugging Face model records
            ``"ViTModel"`` in the shared config): :meth:`apply` then converts that submodule of the model it is
            given. Empty in records of replace_wrap 0.1 (the model itself was converted).

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
    module: str = ""

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
            CompatibilityError: If ``model`` holds several modules converted separately: a record holds one
                conversion, and a record of one of them would reload the others as plain modules, or not at all.
        """
        held = converted_modules(model)
        if len(held) > 1:
            paths = [path or "<the model>" for path, _ in held]
            raise CompatibilityError(
                f"{type(model).__name__} holds {len(held)} modules converted separately ({', '.join(map(repr, paths))}), "
                "and a conversion record holds one conversion: recording one of them would reload the others as "
                "plain modules, or not at all. Convert the model in one call (replace_wrap.convert(model, "
                "policy=replace_wrap.Paths([...every block to replace...]), ...) when the options are the same), or "
                "save the state dict (torch.save(model.state_dict(), path)), which loads into a freshly built model "
                "whose modules are converted again as here, and into the plain model."
            )
        # a model wrapped whole for activation checkpointing is recorded as the model it holds
        return cls.from_report(api.report(model), module=type(unwrap("", model)[1]).__name__)

    @classmethod
    def from_report(cls, rep: ConversionReport, module: str = "") -> ConversionRecord:
        """The record of what a :class:`~replace_wrap.ConversionReport` replaced in a module of class ``module``."""
        blocks = tuple(_keyed(RecordedBlock(b.path, b.prev or "", b.next or "", tuple(b.synthesized))) for b in rep.replaced)
        return cls(rep.config, blocks, rep.route, __version__, module=module)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (what is written to ``replace_wrap.json`` and ``config.json``)."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "library_version": self.library_version,
            "route": self.route,
            "config": self.config.to_dict(),
            "blocks": [dataclasses.asdict(b) | {"tensors": list(b.tensors)} for b in self.blocks],
            "module": self.module,
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
            return cls(config, blocks, str(data["route"]), str(data.get("library_version", "")), version,
                       module=str(data.get("module", "")))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed conversion record: missing or invalid field {exc}") from None

    def policy(self, model: nn.Module | None = None) -> Paths:
        """A policy that selects exactly the recorded blocks (of ``model``: a block that ``model`` holds in a
        ``checkpoint_wrapper`` is the module the wrapper holds, as discovery sees it)."""
        if model is None:
            return Paths([b.path for b in self.blocks])
        paths = {key: path for path, key, _ in keyed_modules(model)}  # of a wrapper and its module, the module
        return Paths([paths.get(recorded_key(b.path), b.path) for b in self.blocks])

    def apply(self, model: M, example_inputs: Any = None) -> M:
        """Convert ``model`` (of the saved architecture, not yet converted) exactly as recorded; return it.

        This is the first half of a load: the scalars start at the config's constant ``init`` (with
        ``init="fit"`` nothing is fitted: the checkpoint supplies them, and the model may be on the meta
        device), so load the checkpoint's state dict next.

        The plan is checked block by block before anything changes: each recorded block must be replaceable
        with the recorded neighbours and tensors.

        Args:
            model: A freshly built model of the architecture the record was saved from.
            example_inputs: Inputs for the ``torch.export`` analysis route, if the original conversion used it.

        Raises:
            StateDictError: If the model's blocks do not match the record (the model is left unchanged).
            AlreadyConvertedError: If ``model`` is already converted.
        """
        target = self._converted_module(model)
        options = {"policy": self.policy(target), "config": self.config, "example_inputs": example_inputs}
        # a structural original stays structural: a graph could order the blocks differently
        options["trace"] = self.route != "structural"
        name = type(target).__name__
        try:
            with scalars_from_checkpoint():
                planned = api.plan(target, **options)
        except PolicyError as exc:
            raise StateDictError(f"cannot re-apply the saved conversion to {name}: {exc}") from None
        got = {recorded_key(b.path): b for b in planned.blocks}
        for want in map(_keyed, self.blocks):
            b = got[want.path]  # Paths guarantees the block exists
            if b.status != "replaced":
                raise StateDictError(
                    f"cannot re-apply the saved conversion to {name}: block {want.path!r} would be {b.status} "
                    f"({b.reason}). Is this the architecture the checkpoint was saved from?"
                )
            if _keyed(RecordedBlock(b.path, b.prev or "", b.next or "", tuple(b.synthesized))) != want:
                raise StateDictError(
                    f"cannot re-apply the saved conversion to {name}: block {want.path!r} was synthesized from "
                    f"{want.prev!r} and {want.next!r} ({len(want.tensors)} tensors) when saved, but this model's "
                    f"analysis ({planned.route}, saved: {self.route}) gives {b.prev!r} and {b.next!r} "
                    f"({len(b.synthesized)} tensors). Pass the example_inputs= of the original conversion, or check "
                    "that the model is built with the same configuration."
                )
        with scalars_from_checkpoint():
            api.convert(target, **options)
        return model

    def _converted_module(self, model: nn.Module) -> nn.Module:
        """``model``, or its one submodule of the recorded class when the record was written from inside it."""
        if not self.module or type(model).__name__ == self.module:
            return model
        found = [(p, m) for p, m in model.named_modules() if type(m).__name__ == self.module]
        if not found:  # another class altogether: the block-by-block check below says what does not fit
            return model
        if len(found) > 1:
            raise StateDictError(
                f"the saved conversion was applied to a {self.module} inside the saved model; {type(model).__name__} "
                f"holds {len(found)} of them ({', '.join(p for p, _ in found[:4])}). Load the checkpoint with the "
                "model class it was saved from."
            )
        return found[0][1]

    def for_base_model(self, model: nn.Module) -> ConversionRecord:
        """The record for ``model`` when it is the Hugging Face base model of the head model it was saved from.

        Hugging Face loads a head model's checkpoint (``LlamaForCausalLM``) into its base model (``LlamaModel``,
        ``AutoModel``) by dropping the ``base_model_prefix`` (``model.``) from the keys; the record's paths drop
        it alike (``replace_wrap.from_pretrained`` applies this one). Anything else keeps the record as it is
        (the block-by-block check of :meth:`apply` then says what does not fit).
        """
        prefix = getattr(model, "base_model_prefix", None)
        if not isinstance(prefix, str) or not prefix or type(model).__name__ == self.module:
            return self
        if prefix in model._modules or getattr(model, prefix, None) is not None:  # a head model: holds its base
            return self
        lead = f"{prefix}."
        if not all(p.startswith(lead) for b in self.blocks for p in (b.path, b.prev, b.next)):
            return self
        blocks = tuple(dataclasses.replace(b, path=b.path[len(lead):], prev=b.prev[len(lead):], next=b.next[len(lead):])
                       for b in self.blocks)
        return dataclasses.replace(self, blocks=blocks, module=type(model).__name__)

    def same_conversion(self, other: ConversionRecord) -> bool:
        """Whether ``other`` replaces the same blocks from the same neighbours with the same options.

        ``plain_state_dict`` and ``init`` are left out: they say how state dicts are written and where the
        scalars started, not what the model computes.
        """
        def key(r: ConversionRecord) -> tuple[ReplaceConfig, tuple[RecordedBlock, ...]]:
            return dataclasses.replace(r.config, plain_state_dict=True, init=UNFITTED_INIT), tuple(map(_keyed, r.blocks))

        return key(self) == key(other)


def _keyed(b: RecordedBlock) -> RecordedBlock:
    """``b`` in state-dict keys (a record written before they were, or a live report's module paths)."""
    return RecordedBlock(recorded_key(b.path), recorded_key(b.prev), recorded_key(b.next), tuple(map(recorded_key, b.tensors)))


def read_record(directory: str | Path) -> ConversionRecord:
    """The :class:`ConversionRecord` saved in ``directory`` (``replace_wrap.json``, else ``config.json``).

    Raises:
        StateDictError: If there is none.
    """
    d = Path(directory)
    if (d / RECORD_FILE).is_file():
        return ConversionRecord.from_dict(json.loads((d / RECORD_FILE).read_text()))
    data = config_record(d)
    if data is not None:
        return ConversionRecord.from_dict(data)
    raise StateDictError(
        f"{d} holds no replace_wrap conversion record (no {RECORD_FILE}, no {CONFIG_KEY!r} key in config.json): "
        "it was not saved from a converted model. A plain or merged checkpoint loads the usual way "
        "(load_state_dict, cls.from_pretrained)."
    )


def config_record(d: Path) -> dict[str, Any] | None:
    cfg = d / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text()).get(CONFIG_KEY)
    return data if isinstance(data, dict) else None
