"""Weight decay and the replaced blocks' scalars: the conventions users already know, applied to ``a, b``.

The scalars ``a, b`` of a replaced block scale the whole synthesized block; weight decay on them shrinks the
block toward zero. Like biases and norm weights, they take no decay:

- :func:`param_groups` builds the usual ``[decay, no decay, scalars]`` groups for any optimizer;
- timm's ``create_optimizer_v2`` already leaves them undecayed (it decays only tensors of two or more
  dimensions; the scalars have one);
- Hugging Face's ``Trainer`` decides by parameter *name* (``bias``, ``norm`` ...) and ``nn.LayerNorm``
  instances only, and transformers 5 offers no model-side hook, so :func:`exclude_from_trainer_decay` wraps
  ``Trainer.get_decay_parameter_names`` to also drop the parameters of replacement sites (this is a patch of
  a transformers class, applied by ``convert`` once transformers' trainer module is imported; a Trainer
  subclass that overrides the method keeps its own);
- a plain ``AdamW(model.parameters())`` decays everything: the first step of any optimizer that decays
  scalars warns once (:func:`watch_optimizers`, a ``torch.optim`` global step pre-hook).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from ..surgery.site import LIVE_SITES, ReplacementSite
from .optim import SCALARS_GROUP

__all__ = ["decays", "exclude_from_trainer_decay", "param_groups", "scalar_names", "watch_optimizers"]

_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def scalar_names(model: nn.Module) -> set[str]:
    """Full names of the replaced blocks' scalars in ``model`` (e.g. ``"blocks.1.replacement.a"``)."""
    return {
        f"{path}.{n}" if path else n
        for path, m in model.named_modules() if isinstance(m, ReplacementSite)
        for n, _ in m.named_parameters()
    }


def decays(name: str, param: torch.Tensor, module: nn.Module, exempt: frozenset[str] = frozenset()) -> bool:
    """Whether a parameter takes weight decay by the common convention (timm's and Hugging Face's together).

    No decay for: tensors of fewer than two dimensions (biases, norm weights, the scalars), names ending in
    ``bias``, parameters of normalization layers (``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm`` and
    any class whose name contains ``Norm``), and the names in ``exempt`` (a timm model's ``no_weight_decay()``).
    """
    if param.dim() <= 1 or name.endswith("bias") or name in exempt:
        return False
    return not (isinstance(module, _NORMS) or "norm" in type(module).__name__.lower())


def param_groups(
    model: nn.Module, weight_decay: float = 0.0, scalar_lr: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with no weight decay on the scalars, norms and biases.

    Args:
        model: A converted (or any) model; only parameters with ``requires_grad`` are included.
        weight_decay: Weight decay of the decayed group (tensors of two or more dimensions that are not in a
            normalization layer, see :func:`decays`).
        scalar_lr: A learning rate for the replaced blocks' scalars (their own group); ``None``: the
            optimizer's. ``merge(model, optimizers=opt)`` trains a merged block's restored tensors in their
            neighbours' groups, at the model's learning rate.

    Returns:
        Up to three groups, empty ones left out: ``{"params": decayed, "weight_decay": weight_decay}``,
        ``{"params": not decayed, "weight_decay": 0.0}``, and the scalars
        ``{"params": scalars, "weight_decay": 0.0, "name": "replace_wrap.scalars"[, "lr": scalar_lr]}`` (the
        name tells ``merge`` the group's options are the scalars' alone; Lightning's learning-rate monitor
        logs it).

    Example:
        >>> import torch, replace_wrap
        >>> net = replace_wrap.convert(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)]))
        >>> groups = replace_wrap.param_groups(net, weight_decay=0.05, scalar_lr=1e-2)
        >>> [(len(g["params"]), g["weight_decay"], g.get("lr")) for g in groups]
        [(3, 0.05, None), (3, 0.0, None), (4, 0.0, 0.01)]
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    exempt = _exempt(model)
    scalars = {id(p) for m in model.modules() if isinstance(m, ReplacementSite) for p in m.parameters()}
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    own: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{name}" if mod_name else name
            if id(p) in scalars:
                own.append(p)
            elif decays(full, p, module, exempt):
                decay.append(p)
            else:
                plain.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0},
              {"params": own, "weight_decay": 0.0, "name": SCALARS_GROUP,
               **({} if scalar_lr is None else {"lr": scalar_lr})}]
    return [g for g in groups if g["params"]]


def _exempt(model: nn.Module) -> frozenset[str]:
    # timm's convention: a model lists the parameters (by name) that take no decay
    fn = getattr(model, "no_weight_decay", None)
    try:
        return frozenset(fn()) if callable(fn) else frozenset()
    except Exception:  # a model's own method failing is no reason to fail here
        return frozenset()


# --- Hugging Face Trainer ------------------------------------------------------------------------------------


def exclude_from_trainer_decay() -> None:
    """Make ``transformers.Trainer`` give the replaced blocks' scalars no weight decay; idempotent.

    transformers 5 picks the decayed parameters by name patterns and ``nn.LayerNorm`` instances only
    (``Trainer.get_decay_parameter_names``), with no hook a model could use. So the method is wrapped: it
    returns what it returned, minus the parameters of replacement sites. Applied now if transformers' trainer
    module is imported, else right after it is (a one-shot import hook, also when transformers itself is
    imported only after ``convert``, as a script converting a timm model before it imports the Trainer does):
    nothing is imported here.
    """
    # The other patches (AT_TRAINER_IMPORT) wrap functions of transformers.trainer_utils, which is public API of
    # its own (load_sharded_checkpoint) and imported before the trainer module: patched at its own import, the
    # trainer module binds the wrapped functions.
    if "transformers.trainer_utils" in sys.modules:
        _run_patches()
    else:
        _after_import("transformers.trainer_utils", lambda module: _run_patches())
    module = sys.modules.get("transformers.trainer")
    if module is not None:
        _wrap_trainer(module)
    else:
        _after_import("transformers.trainer", _wrap_trainer)


def _after_import(name: str, callback: Any) -> None:
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


# Other patches of transformers' trainer modules, applied when transformers.trainer_utils (and again when
# transformers.trainer) is imported (registered by their modules: integrations.hf_sharded wraps the loader of
# sharded checkpoints); each is idempotent.
AT_TRAINER_IMPORT: list[Any] = []


def _run_patches() -> None:
    for patch in AT_TRAINER_IMPORT:
        patch()


def _wrap_trainer(module: Any) -> None:
    _run_patches()
    cls = getattr(module, "Trainer", None)
    original = None if cls is None else cls.__dict__.get("get_decay_parameter_names")
    if original is None or getattr(original, "__replace_wrap__", False):
        return

    @functools.wraps(original)
    def get_decay_parameter_names(self: Any, model: nn.Module) -> list[str]:
        names = original(self, model)
        scalars = scalar_names(model)
        return [n for n in names if n not in scalars] if scalars else names

    get_decay_parameter_names.__replace_wrap__ = True  # type: ignore[attr-defined]
    cls.get_decay_parameter_names = get_decay_parameter_names


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` once, right after ``name`` is first imported; then leaves ``sys.meta_path``."""

    def __init__(self, name: str, callback: Any):
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        except Exception:  # let the import system report whatever is wrong, as it would without us
            return None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenCall(spec.loader, self.callback)
        return spec


class _ThenCall(importlib.abc.Loader):
    def __init__(self, loader: Any, callback: Any):
        self._loader, self._callback = loader, callback

    def __getattr__(self, name: str) -> Any:  # get_source, is_package ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._callback(module)


# --- any other optimizer: a warning at its first step --------------------------------------------------------

_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()
_HOOK: list[Any] = []


def watch_optimizers() -> None:
    """Warn once per optimizer whose first step would decay a replaced block's scalars; idempotent.

    A global ``torch.optim`` step pre-hook (the optimizer is not known at ``convert``); after an optimizer's
    first step it costs one set lookup per step.
    """
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HOOK.append(register_optimizer_step_pre_hook(_check_decay))


def _check_decay(optimizer: Any, args: Any, kwargs: Any) -> None:
    if optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    scalars = {id(p) for site in list(LIVE_SITES) for p in site.parameters()}
    if not scalars:
        return
    for group in optimizer.param_groups:
        decay = group.get("weight_decay", 0.0)
        held = sum(id(p) in scalars for p in group["params"])
        if decay and held:
            warnings.warn(
                f"{type(optimizer).__name__} applies weight_decay={decay} to {held} scalar(s) of replaced blocks "
                "(block.replacement.a/b), which shrinks those blocks toward zero. Build the optimizer from "
                f"replace_wrap.param_groups(model, weight_decay={decay}) (no decay on scalars, norms and biases), "
                "or give the scalars a group with weight_decay=0.",
                UserWarning,
                stacklevel=3,
            )
            return
