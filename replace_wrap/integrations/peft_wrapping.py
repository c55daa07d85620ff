"""What PEFT's ``modules_to_save`` may wrap on a converted model: only modules outside the replaced blocks.

PEFT trains a deep copy of each module that ``modules_to_save`` names (a ``ModulesToSaveWrapper`` holds the
original and the copy). A replaced block's layers have no weights of their own: they synthesize them from the
neighbours' and the block's scalars. A copy of one would compute from private copies of the neighbours that no
model trains, and neither ``save_pretrained`` nor a merge could represent it (the copy refuses its first
forward, see ``surgery.swap``); a copy holding whole blocks would duplicate their scalars; a copy of the scalars
themselves would train a copy that the replaced block never reads. So each is refused before PEFT wraps
anything, by :mod:`replace_wrap.integrations.peft`. A kept neighbour can be wrapped: the replaced block keeps
reading the neighbour's original tensors (as it reads a LoRA layer's ``base_layer``), in training, saved and
merged alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import IntegrationError
from ..report import converted_module
from ..surgery.apply import sites
from ..surgery.site import SITE_ATTR

__all__ = ["matched_paths", "refuse_modules_to_save", "refuse_wrapped", "replaced_blocks", "saved_modules_to_save"]

SCALARS_WRAPPED = (
    "PEFT wraps the scalars of a replaced block ({path!r}, modules_to_save): it would train and save a copy that "
    "the replaced block never reads. Drop 'replacement' from modules_to_save; prepare() trains the scalars and "
    "save_pretrained saves them. {left}"
)


def replaced_blocks(model: nn.Module) -> dict[str, str]:
    """``{replaced block path: its previous neighbour's path}``, both as ``model.named_modules()`` names them."""
    holder = converted_module(model)
    base = next((path for path, m in model.named_modules() if m is holder), "")
    return {path: ".".join(p for p in (base, site.prev_path) if p) for path, _, site in sites(model)}


def matched_paths(model: nn.Module, names: Any, prefix: str) -> list[str]:
    """The paths in ``model`` of the modules that PEFT would wrap for ``modules_to_save=names``.

    PEFT matches by suffix (``key.endswith(name)``, no dot boundary) over the PeftModel's keys, which are
    ``model``'s behind ``prefix`` while ``model`` is not the PeftModel yet (``"base_model.model"``).
    """
    if not names:
        return []
    names = [names] if isinstance(names, str) else list(names)
    return [
        path for path, _ in model.named_modules(remove_duplicate=False)
        if any(".".join(p for p in (prefix, path) if p).endswith(n) for n in names)
    ]


def refuse_modules_to_save(model: nn.Module, peft_config: Any, prefix: str) -> None:
    """Refuse ``peft_config.modules_to_save`` entries that would wrap a module of a replaced block of ``model``."""
    paths = matched_paths(model, getattr(peft_config, "modules_to_save", None), prefix)
    refuse_wrapped(paths, replaced_blocks(model), "The model was left unchanged.")


def refuse_wrapped(paths: list[str], blocks: dict[str, str], left: str) -> None:
    """Raise :class:`IntegrationError` if a wrapper at any of ``paths`` is inside, or holds, a replaced block.

    Args:
        paths: Where ``modules_to_save`` wraps (or would wrap) a module.
        blocks: :func:`replaced_blocks`, in the same names as ``paths``.
        left: The last sentence of the message: what state the model was left in.
    """
    def overlaps(path: str, block: str) -> bool:
        return not path or path == block or block.startswith(path + ".") or path.startswith(block + ".")

    hits = [path for path in paths if any(overlaps(path, b) for b in blocks)]
    if not hits:
        return
    scalars = next((p for p in hits if p in {f"{b}.{SITE_ATTR}" for b in blocks}), None)
    if scalars is not None:
        raise IntegrationError(SCALARS_WRAPPED.format(path=scalars, left=left))
    block = next(b for b in blocks if overlaps(hits[0], b))
    example = ""
    if hits[0].startswith(block + ".") and blocks[block]:  # the same module of the kept neighbour block
        example = f" (e.g. {blocks[block] + hits[0][len(block):]!r})"
    raise IntegrationError(
        f"modules_to_save cannot wrap a module of a replaced block: {hits} would be wrapped, inside or holding the "
        f"replaced block(s) {sorted(b for b in blocks if any(overlaps(p, b) for p in hits))}, whose weights are "
        "synthesized from their neighbours' (PEFT would train a copy with no weights of its own). List only "
        f"modules outside the replaced blocks, by full path{example}, or call replace_wrap.merge(model) first to "
        f"make the replaced blocks plain. {left}"
    )


def saved_modules_to_save(directory: Path) -> Any:
    """``modules_to_save`` of the adapter saved in ``directory`` (None without an ``adapter_config.json``)."""
    config = Path(directory) / "adapter_config.json"
    return json.loads(config.read_text()).get("modules_to_save") if config.is_file() else None
