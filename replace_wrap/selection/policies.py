"""Policies: which blocks of each stack to replace.

A policy is any object with ``select(stack) -> Iterable[int]`` (indices into the stack); subclassing
:class:`Policy` adds the combinators ``&`` (both select) and ``|`` (either selects). A plain callable
``fn(module, path) -> bool`` also works wherever a policy is accepted (it is wrapped in :class:`Filter`).

Policies apply **per stack**: a model with several stacks (an encoder and a decoder, the stages of a CNN
chained into one stack, a vision and a text tower) has each stack offered to the policy in turn. A policy that
needs the whole model at once (a parameter budget) overrides :meth:`Policy.select_all`. A policy that knows
better starting scalars than the config's ``init`` (fitted to pretrained weights) overrides
:meth:`Policy.initial_scalars`. While :func:`replace_wrap.convert` or :func:`replace_wrap.plan` consults a
policy, :func:`current_config` returns the call's :class:`~replace_wrap.ReplaceConfig` (rule, scalars), so a
policy can account exactly for what the conversion will do.

Whatever a policy returns is validated: the first and last block of a stack, two adjacent blocks, or an index
outside the stack raise :class:`~replace_wrap.PolicyError` naming them. :class:`Every` never selects such
blocks, so it never raises.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Callable, Optional, Tuple, Union

import torch
from torch import nn

from ..config import current_config
from ..errors import PolicyError

if TYPE_CHECKING:
    from ..analysis.discovery import Stack
    from ..surgery.matching import BlockMatch

__all__ = [
    "AllOf",
    "AnyOf",
    "Every",
    "Filter",
    "Indices",
    "Paths",
    "Pattern",
    "Policy",
    "as_policy",
    "current_config",
]

Scalars = Optional[Tuple[torch.Tensor, torch.Tensor]]

FilterFn = Callable[[nn.Module, str], bool]
PolicyLike = Union["Policy", FilterFn]


class Policy:
    """Base class of policies: override :meth:`select` (per stack) or :meth:`select_all` (whole model)."""

    def select(self, stack: Stack) -> Iterable[int]:
        """Indices of the blocks of ``stack`` to replace."""
        raise NotImplementedError(f"{type(self).__name__} must implement select(stack)")

    def select_all(self, stacks: Sequence[Stack], model: nn.Module) -> list[set[int]]:
        """Indices to replace for every stack of ``model``; by default :meth:`select` per stack."""
        return [{_index(i, s) for i in self.select(s)} for s in stacks]

    def initial_scalars(self, stack: Stack, index: int, match: BlockMatch, n_sets: int) -> Scalars:
        """Initial ``(a, b)`` for a selected block, or ``None`` for the config's ``init`` (the default).

        Called for every block that will be replaced, after selection. The returned coefficients go through
        the rule (:meth:`~replace_wrap.IntegrationRule.params_from_coefficients`), so they mean the same mix
        for every rule, as far as the rule can express it.

        Args:
            stack: The block's stack.
            index: The block's index in ``stack``.
            match: What will be synthesized: ``match.fused[k]`` is the ``k``-th tensor, with its leaf and the
                neighbours' leaves.
            n_sets: Number of scalar sets of the block: 1 (``scalars="block"``) or ``len(match.fused)``
                (``scalars="tensor"``, in ``match.fused`` order).

        Returns:
            ``None``, or ``(a, b)``: tensors (or numbers) of shape ``(n_sets,)`` or broadcastable to it.
        """
        return None

    def __and__(self, other: PolicyLike) -> AllOf:
        return AllOf(self, other)

    def __or__(self, other: PolicyLike) -> AnyOf:
        return AnyOf(self, other)

    def __rand__(self, other: PolicyLike) -> AllOf:
        return AllOf(other, self)

    def __ror__(self, other: PolicyLike) -> AnyOf:
        return AnyOf(other, self)


class Every(Policy):
    """Replace every ``k``-th block: indices ``offset + k-1, offset + 2k-1, ...``, never first, last or adjacent.

    ``convert(model, every=k)`` is shorthand for ``convert(model, policy=Every(k))``.

    Args:
        k: Period, an integer >= 2 (``k=1`` would replace adjacent blocks).
        offset: Shift of the first selected index, an integer >= 0.

    Example:
        >>> Every(2).indices(8)
        [1, 3, 5]
        >>> Every(3, offset=1).indices(10)
        [3, 6]
    """

    def __init__(self, k: int, offset: int = 0):
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise PolicyError(
                f"every must be an integer >= 2, got {k!r}: every=2 replaces every second block "
                "(k=1 would replace adjacent blocks, which is not allowed)"
            )
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise PolicyError(f"offset must be an integer >= 0, got {offset!r}")
        self.k, self.offset = k, offset

    def indices(self, n: int) -> list[int]:
        """The indices selected in a stack of ``n`` blocks."""
        # start >= k-1 >= 1 and stop n-1 keep first and last out; step k >= 2 keeps picks apart.
        return list(range(self.offset + self.k - 1, n - 1, self.k))

    def select(self, stack: Stack) -> list[int]:
        return self.indices(len(stack))

    def __repr__(self) -> str:
        return f"Every({self.k}" + (f", offset={self.offset})" if self.offset else ")")


class Indices(Policy):
    """Replace the blocks at the given indices (negative indices count from the end).

    Args:
        indices: Indices into each stack.
        stack: Optional regular expression; only stacks whose name fully matches it are selected from
            (stack names look like ``"blocks.*"`` or ``"layer*.*"``, see :func:`replace_wrap.plan`).

    Example:
        >>> Indices([1, -2])
        Indices([1, -2])
    """

    def __init__(self, indices: Iterable[int], stack: str | None = None):
        indices = list(indices)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)]
        if bad:
            raise PolicyError(f"Indices takes integers, got {bad}")
        self.indices, self.stack = indices, stack
        self._stack_re = _compile(stack, "stack") if stack is not None else None

    def select(self, stack: Stack) -> list[int]:
        if self._stack_re is not None and not self._stack_re.fullmatch(stack.name):
            return []
        n = len(stack)
        for i in self.indices:
            if not -n <= i < n:
                raise PolicyError(
                    f"index {i} does not exist in stack {stack.name!r}, which has {n} blocks "
                    f"(replaceable indices are 1..{n - 2}); pass Indices(..., stack=...) to target one stack"
                )
        return [i % n for i in self.indices]

    def __repr__(self) -> str:
        return f"Indices({self.indices!r}" + (f", stack={self.stack!r})" if self.stack else ")")


class Pattern(Policy):
    """Replace the blocks whose module path fully matches ``include`` and matches no ``exclude``.

    Args:
        include: A regular expression or a list of them; ``None`` means every block.
        exclude: A regular expression or a list of them; ``None`` excludes nothing.

    Example:
        >>> p = Pattern(include=r"blocks\\.(3|5)")
        >>> bool(p.matches("blocks.3")), bool(p.matches("blocks.4"))
        (True, False)
    """

    def __init__(self, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None):
        if include is None and exclude is None:
            raise PolicyError("Pattern needs include=, exclude= or both (regular expressions over block paths)")
        self.include, self.exclude = include, exclude
        self._inc = [_compile(p, "include") for p in _as_list(include)] if include is not None else None
        self._exc = [_compile(p, "exclude") for p in _as_list(exclude)] if exclude is not None else []

    def matches(self, path: str) -> bool:
        """Whether a block at ``path`` is selected."""
        if self._inc is not None and not any(r.fullmatch(path) for r in self._inc):
            return False
        return not any(r.fullmatch(path) for r in self._exc)

    def select(self, stack: Stack) -> list[int]:
        return [i for i, p in enumerate(stack.paths) if self.matches(p)]

    def __repr__(self) -> str:
        return f"Pattern(include={self.include!r}, exclude={self.exclude!r})"


class Paths(Policy):
    """Replace exactly the blocks at the given module paths; a path that is no block of any stack is an error.

    Unlike :class:`Pattern`, which may match nothing, every path must name a block, so re-applying a saved
    conversion (:func:`replace_wrap.load`) selects exactly the saved blocks or fails loudly.

    Args:
        paths: Module paths of blocks, e.g. ``["blocks.1", "blocks.3"]``.

    Example:
        >>> import torch, replace_wrap
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
        >>> rep = replace_wrap.plan(net, policy=Paths(["2", "4"]))
        >>> [b.path for b in rep.replaced]
        ['2', '4']
    """

    def __init__(self, paths: Iterable[str]):
        if isinstance(paths, str):  # a lone string would be iterated character by character
            paths = [paths]
        paths = list(paths)
        bad = [p for p in paths if not isinstance(p, str)]
        if bad or not paths:
            raise PolicyError(f"Paths takes a non-empty list of module paths (str), got {bad or paths!r}")
        self.paths = paths

    def select_all(self, stacks: Sequence[Stack], model: nn.Module) -> list[set[int]]:
        wanted = set(self.paths)
        picks = [{i for i, p in enumerate(s.paths) if p in wanted} for s in stacks]
        found = {s.paths[i] for s, pick in zip(stacks, picks) for i in pick}
        missing = [p for p in self.paths if p not in found]
        if missing:
            shown = ", ".join(f"{s.name!r} ({len(s)} blocks)" for s in stacks[:4]) or "none"
            raise PolicyError(
                f"Paths: {missing} {'is no block' if len(missing) == 1 else 'are no blocks'} of any stack of "
                f"{type(model).__name__} (stacks found: {shown}); check the paths with replace_wrap.plan(model), "
                "or pass the same example_inputs= as the original conversion if it used them"
            )
        return picks

    def select(self, stack: Stack) -> list[int]:
        return [i for i, p in enumerate(stack.paths) if p in set(self.paths)]

    def __repr__(self) -> str:
        return f"Paths({self.paths!r})"


class Filter(Policy):
    """Wrap a plain ``fn(module, path) -> bool`` (torchao's ``filter_fn`` convention) as a policy."""

    def __init__(self, fn: FilterFn):
        if not callable(fn):
            raise PolicyError(f"Filter needs a callable fn(module, path) -> bool, got {fn!r}")
        self.fn = fn

    def select(self, stack: Stack) -> list[int]:
        return [i for i, (m, p) in enumerate(zip(stack.modules, stack.paths)) if self.fn(m, p)]

    def __repr__(self) -> str:
        return f"Filter({getattr(self.fn, '__name__', self.fn)!r})"


class _Combination(Policy):
    """Combine the selections of several policies stack by stack with a set operation."""

    _op: Callable[..., set[int]]
    _symbol: str

    def __init__(self, *policies: PolicyLike):
        if not policies:
            raise PolicyError(f"{type(self).__name__} needs at least one policy")
        self.policies = [as_policy(p) for p in policies]

    def select_all(self, stacks: Sequence[Stack], model: nn.Module) -> list[set[int]]:
        picks = [p.select_all(stacks, model) for p in self.policies]
        return [type(self)._op(*col) for col in zip(*picks)]

    def initial_scalars(self, stack: Stack, index: int, match: BlockMatch, n_sets: int) -> Scalars:
        # The first policy (in the order written) with an opinion decides: Similarity() & Pattern(...)
        # keeps Similarity's fitted scalars.
        for p in self.policies:
            found = p.initial_scalars(stack, index, match, n_sets)
            if found is not None:
                return found
        return None

    def __repr__(self) -> str:
        return f" {self._symbol} ".join(map(repr, self.policies))


class AllOf(_Combination):
    """Select the blocks that every one of the policies selects (``p & q``)."""

    _op = set.intersection
    _symbol = "&"


class AnyOf(_Combination):
    """Select the blocks that any of the policies selects (``p | q``); the union is validated."""

    _op = set.union
    _symbol = "|"


def as_policy(obj: object) -> Policy:
    """Return ``obj`` as a :class:`Policy` (a plain callable becomes a :class:`Filter`)."""
    # First match wins: a Policy, then any object with select() (duck-typed), then a plain filter callable.
    if isinstance(obj, Policy):
        return obj
    if hasattr(obj, "select") and callable(obj.select):
        return _Duck(obj)
    if callable(obj):
        return Filter(obj)  # type: ignore[arg-type]
    raise PolicyError(
        f"policy must be a replace_wrap.Policy, an object with select(stack), or a callable "
        f"fn(module, path) -> bool; got {obj!r}"
    )


class _Duck(Policy):
    """Adapter for objects that implement ``select`` without subclassing :class:`Policy`."""

    def __init__(self, obj: object):
        self.obj = obj

    def select(self, stack: Stack) -> Iterable[int]:
        return self.obj.select(stack)  # type: ignore[attr-defined]

    def initial_scalars(self, stack: Stack, index: int, match: BlockMatch, n_sets: int) -> Scalars:
        fn = getattr(self.obj, "initial_scalars", None)
        return fn(stack, index, match, n_sets) if callable(fn) else None

    def __repr__(self) -> str:
        return repr(self.obj)


def _index(i: object, stack: Stack) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise PolicyError(f"a policy must return integer indices; got {i!r} for stack {stack.name!r}")
    return i


def _as_list(p: str | Sequence[str]) -> list[str]:
    return [p] if isinstance(p, str) else list(p)


def _compile(pattern: object, what: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise PolicyError(f"{what} must be a regular expression string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PolicyError(f"{what} pattern {pattern!r} is not a valid regular expression: {exc}") from None
