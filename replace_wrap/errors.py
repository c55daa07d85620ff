"""Typed errors raised by replace_wrap.

Every error derives from :class:`ReplaceWrapError`, so ``except replace_wrap.ReplaceWrapError`` catches all of
them. Each message names the offending module path or value and says what to do next. Subclasses also derive
from the matching builtin (``ValueError``, ``TypeError``, ``RuntimeError``) so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "AlreadyConvertedError",
    "AnalysisError",
    "BudgetError",
    "CompatibilityError",
    "ConfigError",
    "IntegrationError",
    "MergeError",
    "NotConvertedError",
    "NothingToReplaceError",
    "PolicyError",
    "RegistryError",
    "ReplaceWrapError",
    "StateDictError",
    "SynthesisMismatchError",
    "TracingError",
]


class ReplaceWrapError(Exception):
    """Base class of every error raised by replace_wrap."""


class ConfigError(ReplaceWrapError, ValueError):
    """An option of :class:`~replace_wrap.ReplaceConfig` or of ``convert`` has an invalid value."""


class PolicyError(ReplaceWrapError, ValueError):
    """A policy selected blocks that cannot be replaced (first/last of a stack, adjacent, out of range)."""


class BudgetError(PolicyError):
    """A parameter budget cannot be met; ``best_fraction`` is the lowest trainable fraction reachable."""

    def __init__(self, message: str, best_fraction: float = 1.0):
        super().__init__(message)
        self.best_fraction = best_fraction


class RegistryError(ReplaceWrapError, ValueError):
    """A registry entry (integration rule, ...) is duplicated, malformed or unknown."""


class AnalysisError(ReplaceWrapError, RuntimeError):
    """The model's structure could not be analysed."""


class TracingError(AnalysisError):
    """A graph could not be captured (torch.fx or torch.export); the caller falls back to another route."""


class NothingToReplaceError(ReplaceWrapError, ValueError):
    """``convert`` found no block it could replace; the message (and ``.report``) says why."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class AlreadyConvertedError(ReplaceWrapError, RuntimeError):
    """The model (or a submodule of it) is already converted."""


class NotConvertedError(ReplaceWrapError, RuntimeError):
    """An operation that needs a converted model got an unconverted one."""


class MergeError(ReplaceWrapError, RuntimeError):
    """``merge`` or ``revert`` cannot proceed (for example a synthesized tensor is not finite)."""


class CompatibilityError(ReplaceWrapError, RuntimeError):
    """A library or operation cannot work with a converted model as it is (the message says what to do).

    For example ``nn.DataParallel`` replicas, a deep copy of a replaced block without its neighbours, or
    ``torch.fx`` tracing a rule that keeps state.
    """


class StateDictError(ReplaceWrapError, RuntimeError):
    """A state dict does not fit the model (converted vs. unconverted)."""


class SynthesisMismatchError(StateDictError):
    """A state dict's synthesized value of a replaced tensor is not what its own neighbours and scalars synthesize
    in the model that loads it (saved by a model that synthesizes by another rule, or edited after saving).

    Attributes:
        key: The state-dict key of the first such tensor.
        max_diff: Its largest absolute difference (``inf`` where one side is not finite and the other is).
        tolerance: The difference allowed for it (dtype-aware, see :mod:`replace_wrap.io.verify`).
    """

    def __init__(self, message: str, key: str = "", max_diff: float = 0.0, tolerance: float = 0.0):
        super().__init__(message)
        self.key, self.max_diff, self.tolerance = key, max_diff, tolerance


class IntegrationError(ReplaceWrapError, RuntimeError):
    """A library combined with a converted model (PEFT, ...) is used in a way that would not give the trained
    function; the message names the supported recipe."""
