"""transformers' ``load_sharded_checkpoint`` on a converted model: checked once, on the whole checkpoint.

The Hugging Face ``Trainer`` loads a sharded checkpoint (one above ``save_pretrained``'s ``max_shard_size``)
with ``transformers.trainer_utils.load_sharded_checkpoint``, for ``resume_from_checkpoint`` and for
``load_best_model_at_end``: one ``model.load_state_dict(shard, strict=False)`` per shard, in no fixed order.
A shard of a converted model's checkpoint may hold a replaced block's synthesized values without its scalars,
which the state-dict guard cannot tell from a state dict of an unconverted model: it refused such a shard,
naming a wrong conversion, after other shards had loaded. So the function is wrapped (a patch of
transformers, applied by ``convert`` once transformers' trainer module is imported, like the weight-decay
one, registered in :mod:`replace_wrap.integrations.decay`): for a converted model it checks the index's keys (and the scalars' shapes) as one state dict before
reading any shard, compares the synthesized values with what their neighbours and scalars give (reading those
tensors alone, :mod:`replace_wrap.io.verify`), refuses as for a whole state dict, and lets each shard load with
its synthesized values dropped. Unconverted models go to the original untouched.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

from ..io.checkpoint import read_tensors
from ..io.guard import converted, whole_checked
from ..surgery.site import SITE_ATTR
from . import decay

__all__ = ["wrap_sharded_loading"]

_SAFE_INDEX, _BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


class _Shape:
    def __init__(self, shape: tuple[int, ...] = ()):
        self.shape = shape


def wrap_sharded_loading() -> None:
    """Wrap ``load_sharded_checkpoint`` in ``transformers.trainer_utils`` and ``transformers.trainer`` (which
    binds it at import); idempotent, imports nothing."""
    utils = sys.modules.get("transformers.trainer_utils")
    original = getattr(utils, "load_sharded_checkpoint", None)
    if original is None:
        return
    wrapped = original if getattr(original, "__replace_wrap__", False) else _wrap(original)
    for name in ("transformers.trainer_utils", "transformers.trainer", "transformers"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "load_sharded_checkpoint", None) is original:
            module.load_sharded_checkpoint = wrapped


decay.AT_TRAINER_IMPORT.append(wrap_sharded_loading)


def _wrap(original: Any) -> Any:
    @functools.wraps(original)
    def load_sharded_checkpoint(model: Any, folder: Any, strict: bool = True, prefer_safe: bool = True) -> Any:
        if not converted(model):
            return original(model, folder, strict, prefer_safe)
        # the values the check compares (synthesized values, their neighbours and scalars) are read alone
        read = functools.partial(read_tensors, folder)
        with whole_checked(model, _index_state(str(folder), prefer_safe), read):
            return original(model, folder, strict, prefer_safe)

    load_sharded_checkpoint.__replace_wrap__ = True  # type: ignore[attr-defined]
    return load_sharded_checkpoint


def _index_state(folder: str, prefer_safe: bool) -> dict[str, _Shape]:
    """Every key of the checkpoint (as ``load_sharded_checkpoint`` picks its index), with the shapes of the
    replacement sites' tensors (read from the shards' headers); an unreadable index goes on to the original,
    which reports it."""
    safe, binary = os.path.join(folder, _SAFE_INDEX), os.path.join(folder, _BIN_INDEX)
    use_safe = os.path.isfile(safe) and (prefer_safe or not os.path.isfile(binary))
    index = safe if use_safe else binary
    if not os.path.isfile(index):
        return {}
    with open(index, encoding="utf-8") as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]
    state = {k: _Shape() for k in weight_map}
    marker = f"{SITE_ATTR}."
    wanted: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if marker in key:
            wanted.setdefault(shard, []).append(key)
    for shard, keys in wanted.items():
        path = os.path.join(folder, shard)
        if use_safe:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for k in keys:
                    state[k] = _Shape(tuple(f.get_slice(k).get_shape()))
        else:
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for k in keys:
                state[k] = _Shape(tuple(loaded[k].shape))
    return state
