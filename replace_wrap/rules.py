"""Integration rules: how a replaced block's scalars turn neighbour tensors into its own.

A rule owns the learnable parameters of a replacement site (their names, shapes and initial values) and maps
them to the synthesized tensor. Rules are registered by name with :func:`register_rule` and chosen with
``ReplaceConfig(rule=...)``. Every rule must define a merge: :meth:`IntegrationRule.synthesize` under
``torch.no_grad()`` is what :func:`replace_wrap.merge` materializes, so a rule whose forward depends on state
other than its parameters must keep that state in buffers of the site.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from .errors import ConfigError, RegistryError
from .fusion import mix

if TYPE_CHECKING:
    from .hooks import ReplacementSite

__all__ = ["ConvexRule", "IntegrationRule", "LinearRule", "get_rule", "list_rules", "register_rule"]

_RULES: dict[str, type[IntegrationRule]] = {}

R = TypeVar("R", bound="type[IntegrationRule]")


class IntegrationRule:
    """Base class of integration rules.

    Subclasses define :meth:`init_params` and :meth:`coefficients`; :meth:`synthesize` mixes with those
    coefficients and may be overridden by rules that are not a linear mix. The parameters returned by
    :meth:`init_params` become fp32 parameters of the :class:`~replace_wrap.hooks.ReplacementSite`, which is
    what the other methods receive.
    """

    name: str = ""

    def check_init(self, init: tuple[float, float]) -> None:
        """Raise :class:`~replace_wrap.ConfigError` if this rule cannot start from ``init = (a, b)``."""

    def init_params(self, n: int, init: tuple[float, float]) -> dict[str, torch.Tensor]:
        """The site's learnable fp32 parameters for ``n`` scalar sets, each of shape ``(n,)``."""
        raise NotImplementedError

    def coefficients(self, site: ReplacementSite) -> tuple[torch.Tensor, torch.Tensor]:
        """Map the site's parameters to ``(a, b)``, each of shape ``(n,)``."""
        raise NotImplementedError

    def synthesize(self, site: ReplacementSite, index: int, prev: torch.Tensor, next: torch.Tensor) -> torch.Tensor:
        """The synthesized tensor for scalar set ``index`` from the neighbours' tensors."""
        a, b = self.coefficients(site)
        if a.numel() > 1 or prev.dim() == 0:
            a, b = a[index], b[index]
        # else one set of shape (1,) broadcasts as it is: no select (and select backward) per tensor and step
        return mix(a, b, prev, next)


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
        if cls.init_params is IntegrationRule.init_params:
            raise RegistryError(f"rule {cls.__qualname__} must define init_params()")
        if cls.coefficients is IntegrationRule.coefficients and cls.synthesize is IntegrationRule.synthesize:
            raise RegistryError(f"rule {cls.__qualname__} must define coefficients() or synthesize()")
        cls.name = name
        _RULES[name] = cls
        return cls

    return decorator


def get_rule(name: str) -> IntegrationRule:
    """Instantiate the rule registered as ``name``."""
    try:
        return _RULES[name]()
    except KeyError:
        raise RegistryError(
            f"unknown integration rule {name!r}; registered rules: {', '.join(sorted(_RULES))}. "
            "Register your own with @replace_wrap.register_rule(name)."
        ) from None


def list_rules() -> list[str]:
    """Names of the registered integration rules, sorted."""
    return sorted(_RULES)


@register_rule("linear")
class LinearRule(IntegrationRule):
    """The paper's rule: ``W = a * W_prev + b * W_next`` with free scalars ``a, b``."""

    def init_params(self, n: int, init: tuple[float, float]) -> dict[str, torch.Tensor]:
        return {"a": torch.full((n,), init[0]), "b": torch.full((n,), init[1])}

    def coefficients(self, site: ReplacementSite) -> tuple[torch.Tensor, torch.Tensor]:
        return site.a, site.b


@register_rule("convex")
class ConvexRule(IntegrationRule):
    """A convex mix: ``a = sigmoid(alpha)``, ``b = 1 - a``; one learnable scalar per set."""

    def check_init(self, init: tuple[float, float]) -> None:
        a, b = init
        if not (0.0 < a < 1.0) or not math.isclose(a + b, 1.0, abs_tol=1e-6):
            raise ConfigError(
                f"rule='convex' needs init=(a, 1 - a) with 0 < a < 1, got init={init}; e.g. init=(0.5, 0.5)"
            )

    def init_params(self, n: int, init: tuple[float, float]) -> dict[str, torch.Tensor]:
        alpha = math.log(init[0] / (1.0 - init[0]))  # logit, so that sigmoid(alpha) == a
        return {"alpha": torch.full((n,), alpha)}

    def coefficients(self, site: ReplacementSite) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.sigmoid(site.alpha)
        return a, 1.0 - a
