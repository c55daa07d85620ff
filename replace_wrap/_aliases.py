"""The module paths of replace_wrap 0.1 (``replace_wrap.rules``, ``replace_wrap.hooks``, ...), kept importable.

The library's public API is what ``replace_wrap`` exports; these paths were internal, but documentation and
user code reached into some of them (``replace_wrap.rules.EMARule``). Each old path is a module object that
forwards attribute reads to the module that owns the name now, with a ``DeprecationWarning`` naming it.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

_PACKAGE = __name__.rpartition(".")[0]

# old module name -> the modules that own its names now, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "adapt": ("synthesis.adapt",),
    "bench": ("cli.bench",),
    "budget": ("selection.budget",),
    "distributed": ("integrations.fsdp",),
    "fusion": ("synthesis.maths",),
    "graph": ("analysis.discovery",),
    "hooks": ("surgery.swap", "surgery.site"),
    "leaves": ("synthesis.layer_kernels",),
    "matching": ("surgery.matching",),
    "mixed_ops": ("synthesis.kernels",),
    "persistence": ("io.checkpoint", "io.record", "io.guard"),
    "policy": ("selection.policies",),
    "rules": ("synthesis.rules",),
    "similarity": ("selection.similarity",),
    "tracing": ("analysis.capture",),
}


class _MovedModule(types.ModuleType):
    def __init__(self, old: str, targets: tuple[str, ...]):
        super().__init__(f"{_PACKAGE}.{old}", f"Moved: see {', '.join(f'{_PACKAGE}.{t}' for t in targets)}.")
        self._targets = targets

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for target in self._targets:
            module = importlib.import_module(f"{_PACKAGE}.{target}")
            if hasattr(module, name):
                warnings.warn(
                    f"{self.__name__}.{name} moved to {_PACKAGE}.{target}.{name}; the old path will be removed "
                    "in a future release",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (moved to {self._targets}) has no attribute {name!r}")


def _install() -> None:
    package = sys.modules[_PACKAGE]
    for old, targets in MOVED.items():
        module = _MovedModule(old, targets)
        sys.modules.setdefault(module.__name__, module)
        if not hasattr(package, old):
            setattr(package, old, module)


_install()
