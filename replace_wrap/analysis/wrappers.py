"""Wrappers whose child is hidden from state-dict keys, and the one map from module paths to state-dict keys.

torch's activation checkpointing (``checkpoint_wrapper``, ``offload_wrapper``, ``apply_activation_checkpointing``,
as Accelerate's FSDP recipes and torchtitan apply them) holds a module as ``<path>._checkpoint_wrapped_module``
and registers hooks that drop that segment from every key ``state_dict()`` writes, and add it back before a
load. So a tensor that ``named_parameters()`` calls ``blocks.1._checkpoint_wrapped_module.fc1.weight`` is
``blocks.1.fc1.weight`` in a state dict, and a checkpoint loads into the model with or without the wrapper.

Every key replace_wrap writes into or looks up in a state dict is built by :func:`key_path` from module paths,
so that its keys are the ones torch writes wherever the wrapper sits (around a block, inside it, around the
model). Discovery sees through such a wrapper (:func:`unwrap`): the block is the module it holds, so the
scalars live inside the wrapper, where its load hook sends their keys.

Wrappers of a whole model whose keys keep their segment (``torch.compile``'s ``OptimizedModule`` writes
``_orig_mod.``, ``DistributedDataParallel`` and ``DataParallel`` write ``module.``) are torch's keys as they are:
a state dict of the wrapper loads into the same wrapper. Only a checkpoint that must load anywhere
(``replace_wrap.save``) is written from the model inside (:func:`held_model`). FSDP1's
``_fsdp_wrapped_module`` is neither (``convert`` and ``merge`` refuse FSDP1).

Example:
    >>> import torch
    >>> from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), checkpoint_wrapper(torch.nn.Linear(2, 2)))
    >>> key_path(net, "1._checkpoint_wrapped_module")
    '1'
    >>> key_path(net, "1._checkpoint_wrapped_module.weight", tensor=True) in net.state_dict()
    True
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

__all__ = ["held_model", "hides", "key_path", "keyed_modules", "recorded_key", "unwrap"]

# The child name a wrapper's state-dict hooks drop from keys -> (module, class) of that wrapper. Looked up in
# sys.modules: a model cannot hold the wrapper unless its module was imported, so nothing is imported here.
_HIDDEN: dict[str, tuple[str, str]] = {
    # CheckpointWrapper and OffloadWrapper (torch >= 2.1): _post_state_dict_hook / _pre_load_state_dict_hook
    "_checkpoint_wrapped_module": ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper"),
}


# Wrappers holding one whole model that change its keys (by a prefix) and nothing it computes or saves besides:
# class -> the attribute holding the model. Looked up in sys.modules, as _HIDDEN.
_HOLDERS: dict[tuple[str, str], str] = {
    ("torch._dynamo.eval_frame", "OptimizedModule"): "_orig_mod",  # torch.compile(model)
    ("torch.nn.parallel.distributed", "DistributedDataParallel"): "module",
    ("torch.nn.parallel.data_parallel", "DataParallel"): "module",
}


def held_model(model: nn.Module) -> nn.Module:
    """``model`` without the whole-model wrappers of :data:`_HOLDERS` (``torch.compile``, (Distributed)DataParallel),
    nested in any order: what a checkpoint that loads anywhere is written from (a checkpoint of the wrapper names
    its blocks and tensors with the wrapper's prefix and loads only into the same wrapper)."""
    while True:
        attr = next((a for (mod, name), a in _HOLDERS.items()
                     if isinstance(cls := getattr(sys.modules.get(mod), name, None), type) and isinstance(model, cls)),
                    None)
        if attr is None:
            return model
        model = getattr(model, attr)


def hides(parent: nn.Module, name: str) -> bool:
    """Whether ``parent``'s state-dict hooks drop its child ``name`` from the keys (a wrapper's held module)."""
    spec = _HIDDEN.get(name)
    if spec is None:
        return False
    cls = getattr(sys.modules.get(spec[0]), spec[1], None)
    return isinstance(cls, type) and isinstance(parent, cls)


def unwrap(path: str, module: nn.Module) -> tuple[str, nn.Module]:
    """The module a wrapper of hidden children holds, and its path (``module`` itself if it is none)."""
    while True:
        inner = next(((n, c) for n, c in module._modules.items() if c is not None and hides(module, n)), None)
        if inner is None:
            return path, module
        path, module = (f"{path}.{inner[0]}" if path else inner[0]), inner[1]


def key_path(root: nn.Module, path: str, tensor: bool = False) -> str:
    """The state-dict key that ``root.state_dict()`` writes for the module at ``path`` (without the trailing
    dot), or with ``tensor=True`` for the tensor ``path`` (``<module path>.<name>``).

    A path that does not resolve from some point on (a module removed since) keeps its remaining segments.
    """
    if not path:
        return path
    parts = path.split(".")
    walk, last = (parts[:-1], parts[-1:]) if tensor else (parts, [])
    kept: list[str] = []
    module: nn.Module | None = root
    for part in walk:
        if module is not None and hides(module, part):
            module = module._modules[part]
            continue
        kept.append(part)
        module = None if module is None else module._modules.get(part)
    return ".".join(kept + last)


def recorded_key(path: str) -> str:
    """:func:`key_path` of a path read without its model (a saved record's): the hidden children's names are
    dropped wherever they occur, being their wrappers' reserved attribute names."""
    return ".".join(p for p in path.split(".") if p not in _HIDDEN) if path else path


def keyed_modules(root: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(path, key, module)`` of every module of ``root``, in ``root.named_modules()`` order, where ``key`` is
    :func:`key_path` of ``path``. A wrapper and the module it holds share a key; the held module comes later."""
    seen: set[int] = set()
    todo: list[tuple[str, str, nn.Module]] = [("", "", root)]
    while todo:
        path, key, module = todo.pop()
        if id(module) in seen:  # a shared module is listed once, under its first path (as named_modules does)
            continue
        seen.add(id(module))
        yield path, key, module
        children = []
        for name, child in module._modules.items():
            if child is None:
                continue
            sub = f"{path}.{name}" if path else name
            children.append((sub, key if hides(module, name) else (f"{key}.{name}" if key else name), child))
        todo.extend(reversed(children))  # depth-first, children in registration order
