"""Integration rules: how a replaced block's scalars turn neighbour tensors into its own.

A rule owns the learnable parameters of a replacement site (their names, shapes and initial values), any
state it keeps (buffers of the site), and the map to the synthesized tensor. Rules are registered by name with
:func:`register_rule` and chosen with ``ReplaceConfig(rule=...)``; ``linear`` (the paper), ``convex`` and
``ema`` are built in.

Every rule defines its merge: :func:`replace_wrap.merge` materializes what :meth:`IntegrationRule.synthesize_tensor`
returns inside :func:`state_frozen`, so a rule whose forward depends on state other than its parameters keeps that
state in buffers of the site (saved in ``state_dict``) and must not change it inside :func:`state_frozen` (nor in
eval mode).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Callable, TypeVar

import torch
from torch import nn

from ..errors import ConfigError, RegistryError
from .maths import mix

__all__ = [
    "ConvexRule",
    "EMARule",
    "IntegrationRule",
    "LinearRule",
    "get_rule",
    "is_linear_mix",
    "list_rules",
    "register_rule",
    "state_frozen",
]

_RULES: dict[str, type[IntegrationRule]] = {}

R = TypeVar("R", bound="type[IntegrationRule]")


class IntegrationRule:
    """Base class of integration rules.

    A rule must define :meth:`init_params` and :meth:`coefficients`; everything else has a default. The
    parameters returned by :meth:`init_params` become fp32 parameters of the
    :class:`~replace_wrap.ReplacementSite`, the buffers returned by :meth:`init_buffers` its state;
    the other methods receive that site.

    Attributes:
        name: The registered name (set by :func:`register_rule`).
        affine: ``True`` if the rule can only express ``a + b = 1`` (fits of ``a, b``, e.g. by
            :class:`~replace_wrap.Similarity`, are then constrained to it).
    """

    name: str = ""
    affine: bool = False

    def check_init(self, init: tuple[float, float]) -> None:
        """Raise :class:`~replace_wrap.ConfigError` if this rule cannot start from ``init = (a, b)``."""

    def init_params(self, n: int, init: tuple[float, float]) -> dict[str, torch.Tensor]:
        """The site's learnable fp32 parameters for ``n`` scalar sets, each of shape ``(n,)``."""
        raise NotImplementedError

    def params_from_coefficients(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters whose :meth:`coefficients` are ``(a, b)`` (shape ``(n,)`` each), as near as the rule allows.

        Used when a policy supplies per-block initial scalars (:meth:`replace_wrap.Policy.initial_scalars`).
        The default builds each set with :meth:`init_params` from its own ``(a[i], b[i])`` after
        :meth:`check_init`; override it for a rule that can represent more than it accepts as ``init``.
        """
        parts = []
        for ai, bi in zip(a.tolist(), b.tolist()):
            self.check_init((ai, bi))
            parts.append(self.init_params(1, (ai, bi)))
        return {k: torch.cat([p[k].reshape(-1) for p in parts]) for k in parts[0]}

    def init_buffers(self, site: nn.Module, own: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """State of a stateful rule, registered as buffers of ``site`` (saved in ``state_dict``).

        State that must not be saved (a cache, a record of the last access) the rule registers on ``site``
        itself with ``site.register_buffer(name, tensor, persistent=False)``.

        Args:
            site: The site, with its parameters already registered.
            own: The replaced block's own tensors at conversion, in ``site.tensor_names`` order.
        """
        return {}

    def coefficients(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Map the site's parameters to ``(a, b)``, each of shape ``(n,)``: the mix the rule stands for."""
        raise NotImplementedError

    def synthesize(
        self, site: nn.Module, index: int, prev: torch.Tensor, next: torch.Tensor
    ) -> torch.Tensor:
        """The synthesized tensor for scalar set ``index`` from the neighbours' tensors."""
        a, b = self.coefficients(site)
        if a.numel() > 1 or prev.dim() == 0:
            a, b = a[index], b[index]
        # else one set of shape (1,) broadcasts as it is: no select (and select backward) per tensor and step
        return mix(a, b, prev, next)

    def synthesize_tensor(
        self, site: nn.Module, k: int, prev: torch.Tensor, next: torch.Tensor
    ) -> torch.Tensor:
        """The ``k``-th synthesized tensor of the site (``site.tensor_names[k]``).

        What the hooks call. The default delegates to :meth:`synthesize` with the tensor's scalar set;
        a rule with per-tensor state (:class:`EMARule`) overrides this instead.
        """
        return self.synthesize(site, site.index_of(k), prev, next)


def register_rule(name: str) -> Callable[[R], R]:
    """Class decorator registering an :class:`IntegrationRule` subclass under ``name``.

    Example:
        >>> @register_rule("doc_example_mean")
        ... class MeanRule(IntegrationRule):
        ...     def init_params(self, n, init):
        ...         return {"scale": torch.ones(n)}
        ...     def coefficients(self, site):
        ...         return site.scale / 2, site.scale / 2
        >>> "doc_example_mean" in list_rules()
        True
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(f"a rule name must be a Python identifier, got {name!r}")

    def decorator(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, IntegrationRule)):
            raise RegistryError(f"@register_rule({name!r}) needs an IntegrationRule subclass, got {cls!r}")
        if name in _RULES and _RULES[name] is not cls:
            raise RegistryError(
                f"an integration rule named {name!r} is already registered ({_RULES[name].__qualname__}); "
                "choose another name"
            )
        _validate_rule_class(name, cls)
        cls.name = name
        _RULES[name] = cls
        return cls

    return decorator


# method -> parameter names after self; a rule overriding one must keep this signature
_SIGNATURES = {
    "check_init": ("init",),
    "init_params": ("n", "init"),
    "params_from_coefficients": ("a", "b"),
    "init_buffers": ("site", "own"),
    "coefficients": ("site",),
    "synthesize": ("site", "index", "prev", "next"),
    "synthesize_tensor": ("site", "k", "prev", "next"),
}


def _validate_rule_class(name: str, cls: type[IntegrationRule]) -> None:
    where = f"@register_rule({name!r}) on {cls.__qualname__}"
    for required in ("init_params", "coefficients"):
        if getattr(cls, required) is getattr(IntegrationRule, required):
            raise RegistryError(
                f"{where}: the rule must define {required}() (see replace_wrap.IntegrationRule; "
                "coefficients() returns the (a, b) the rule stands for, shown in reports)"
            )
    for method, expected in _SIGNATURES.items():
        fn = getattr(cls, method)
        if not callable(fn):
            raise RegistryError(f"{where}: {method} must be a method, got {fn!r}")
        try:
            params = list(inspect.signature(fn).parameters.values())[1:]
        except (TypeError, ValueError):  # builtins without a signature: nothing to check
            continue
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            continue
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        if len(required) > len(expected) or len(positional) < len(expected):
            got = ", ".join(p.name for p in params)
            raise RegistryError(
                f"{where}: {method}(self, {got}) has the wrong signature; it is called as "
                f"{method}(self, {', '.join(expected)})"
            )
    if not isinstance(cls.affine, bool):
        raise RegistryError(f"{where}: the class attribute affine must be True or False, got {cls.affine!r}")


def get_rule(name: str) -> IntegrationRule:
    """Instantiate the rule registered as ``name``."""
    try:
        return _RULES[name]()
    except KeyError:
        raise RegistryError(
            f"unknown integration rule {name!r}; registered rules: {', '.join(sorted(_RULES))}. "
            "Register your own with @replace_wrap.register_rule(name)."
        ) from None


def is_linear_mix(rule: IntegrationRule) -> bool:
    """Whether ``rule`` synthesizes ``a * prev + b * next`` from its coefficients (what layer kernels compute).

    A rule with its own synthesis (a non-linear map, or per-tensor state like ``'ema'``) keeps the generic path.
    """
    return (
        type(rule).synthesize is IntegrationRule.synthesize
        and type(rule).synthesize_tensor is IntegrationRule.synthesize_tensor
    )


def list_rules() -> list[str]:
    """Names of the registered integration rules, sorted."""
    return sorted(_RULES)


@register_rule("linear")
class LinearRule(IntegrationRule):
    """The paper's rule: ``W = a * W_prev + b * W_next`` with free scalars ``a, b``."""

    def init_params(self, n: int, init: tuple[float, float]) -> dict[str, torch.Tensor]:
        return {"a": torch.full((n,), init[0]), "b": torch.full((n,), init[1])}

    def coefficients(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return site.a, site.b


@register_rule("convex")
class ConvexRule(IntegrationRule):
    """A convex mix: ``a = sigmoid(alpha)``, ``b = 1 - a``; one learnable scalar per set."""

    affine = True

    def check_init(self, init: tuple[float, float]) -> None:
        a, b = init
        if not (0.0 < a < 1.0) or not math.isclose(a + b, 1.0, abs_tol=1e-6):
            raise ConfigError(
                f"rule='convex' needs init=(a, 1 - a) with 0 < a < 1, got init={init}; e.g. init=(0.5, 0.5)"
            )

    def init_params(self, n: int, init: tuple[float, float]) -> dict[str, torch.Tensor]:
        alpha = math.log(init[0] / (1.0 - init[0]))  # logit, so that sigmoid(alpha) == a
        return {"alpha": torch.full((n,), alpha)}

    def params_from_coefficients(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        # Nearest point on a + b = 1 (Euclidean), then into the open interval sigmoid can reach.
        a = ((1.0 + a.double() - b.double()) / 2).clamp(_CONVEX_EPS, 1.0 - _CONVEX_EPS)
        return {"alpha": torch.logit(a).float()}

    def coefficients(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.sigmoid(site.alpha)
        return a, 1.0 - a


_CONVEX_EPS = 1e-4


@register_rule("ema")
class EMARule(IntegrationRule):
    """A momentum shadow of the neighbour mix, times a learnable scale (MLAAN/MAN-style).

    Each synthesized tensor ``k`` reads ``W_k = scale * shadow_k``, where the buffer ``shadow_k`` starts as the
    block's own tensor at conversion (so the converted model first computes exactly what the original did)
    and then follows ``target_k = a * W_prev + b * W_next``::

        shadow_k <- momentum * shadow_k + (1 - momentum) * target_k

    **When it updates.** Once per change of the target, at the first access in training mode after the change
    (every optimizer step changes the neighbours and the scalars, so every step). The target is compared by
    value with the one of the last access, so the rule needs nothing from the optimizer, the tensors' version
    counters or their storage: gradient accumulation, repeated accesses, and the recomputation of gradient
    checkpointing (reentrant or not, which runs the forward with or without gradients) all see the same
    shadow, and sharded or compiled models behave the same. Eval mode never changes it, nor does
    :func:`state_frozen` (``merge``, checkpoint writers). The first training access after conversion, a copy
    or a load only records the target (the buffers that remember it are not saved).

    **Gradients.** ``scale`` learns directly. The value is ``scale * shadow``, and the derivative of the next
    shadow, ``(1 - momentum) * d target``, is added as a zero-valued term, so ``a`` and ``b`` (and, with
    ``neighbour_grad="coupled"``, the neighbours) get the gradient of where the shadow is heading.

    **Merge.** ``scale * shadow`` at the time of the merge (no further update).

    **Cost.** Per replaced tensor, a shadow (saved) and the last target (not saved), both of the tensor's size:
    trainable parameters and optimizer state shrink as with ``linear``, memory does not. Three learnable
    scalars per set (``a``, ``b``, ``scale``). Another momentum is a subclass::

        @replace_wrap.register_rule("ema_fast")
        class FastEMA(replace_wrap.synthesis.rules.EMARule):
            momentum = 0.9
    """

    momentum: float = 0.99

    def check_init(self, init: tuple[float, float]) -> None:
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise ConfigError(
                f"rule {self.name!r}: momentum must be a number in [0, 1), got {m!r}; set it as a class "
                "attribute of an EMARule subclass"
            )

    def init_params(self, n: int, init: tuple[float, float]) -> dict[str, torch.Tensor]:
        return {"a": torch.full((n,), init[0]), "b": torch.full((n,), init[1]), "scale": torch.ones(n)}

    def init_buffers(self, site: nn.Module, own: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(own) != len(site.tensor_names):
            raise ConfigError(
                f"rule {self.name!r} starts its shadows from the block's own tensors: got {len(own)} tensors "
                f"for {len(site.tensor_names)} synthesized ones"
            )
        for k, t in enumerate(own):  # what the last access saw; not saved: a load starts by recording
            site.register_buffer(f"seen_{k}", torch.zeros_like(t, requires_grad=False), persistent=False)
        site.register_buffer("recorded", torch.zeros(len(own), dtype=torch.bool, device=own[0].device),
                             persistent=False)
        return {f"shadow_{k}": t.detach().clone() for k, t in enumerate(own)}

    def coefficients(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        # the mix the shadow converges to while the neighbours stand still
        return site.scale * site.a, site.scale * site.b

    def synthesize_tensor(
        self, site: nn.Module, k: int, prev: torch.Tensor, next: torch.Tensor
    ) -> torch.Tensor:
        i = site.index_of(k)
        shadow = site.get_buffer(f"shadow_{k}")
        target = mix(site.a[i], site.b[i], prev, next)
        if site.training and not _FROZEN[0]:
            self._follow(site, k, shadow, target.detach())
        dtype = prev.dtype
        ahead = (1.0 - self.momentum) * (target - target.detach())  # zero value, gradient of the next shadow
        return site.scale[i].to(dtype) * (shadow.to(dtype) + ahead)

    def _follow(self, site: nn.Module, k: int, shadow: torch.Tensor, target: torch.Tensor) -> None:
        # Branch-free, so that compiled graphs neither break nor specialize on the outcome.
        with torch.no_grad():
            seen, recorded = site.get_buffer(f"seen_{k}"), site.get_buffer("recorded")
            target = target.to(seen.dtype)
            update = recorded[k] & (target != seen).any()
            shadow.copy_(torch.where(update, torch.lerp(shadow, target.to(shadow.dtype), 1.0 - self.momentum), shadow))
            seen.copy_(target)
            recorded[k] = True


# A depth counter rather than a context variable: compiled graphs read a plain global (and guard on it).
_FROZEN = [0]


@contextlib.contextmanager
def state_frozen() -> Iterator[None]:
    """Within the block, no rule changes its state (``merge`` and checkpoint writers read synthesized values).

    Example:
        >>> with state_frozen():
        ...     pass
    """
    _FROZEN[0] += 1
    try:
        yield
    finally:
        _FROZEN[0] -= 1
