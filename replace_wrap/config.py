"""The conversion config: a validated, versioned dataclass."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, RegistryError

__all__ = ["CONFIG_VERSION", "ReplaceConfig", "current_config", "using_config"]

_SCALARS = ("block", "tensor")
# 2: ab_grad_sample may be "auto", its new default (version 1, replace_wrap 0.1 and 0.2: None, exact, by default).
# 3: init may be "fit" (a replace_wrap that reads version 2 would reject it).
CONFIG_VERSION = 3
# Where a block starts when its scalars are not fitted: the default init, and where a load that supplies the
# scalars starts a conversion recorded with init="fit".
UNFITTED_INIT = (0.5, 0.5)
_NEIGHBOUR_GRAD = ("detached", "coupled")


@dataclass(frozen=True)
class ReplaceConfig:
    """How replaced blocks synthesize their weights.

    Args:
        rule: Name of the integration rule (see :func:`replace_wrap.list_rules`). ``"linear"`` (the paper):
            ``W = a * W_prev + b * W_next``; ``"convex"``: ``a = sigmoid(alpha)``, ``b = 1 - a``.
        scalars: ``"block"``: one set of scalars per replaced block; ``"tensor"``: one set per synthesized
            tensor.
        neighbour_grad: ``"detached"``: the neighbours' tensors are detached inside the synthesis, so only the
            site's scalars learn there; ``"coupled"``: gradient also flows into the neighbours.
        keep_original: Keep a frozen copy of each replaced tensor (as buffers) so that
            :func:`replace_wrap.revert` can restore the block.
        init: How each replaced block's scalars start. ``(a, b)`` (default ``(0.5, 0.5)``): those two numbers
            for every block (rules that parametrize differently map them to their own parameters). ``"fit"``:
            the least-squares fit of the block's own tensors (their values at conversion) to its neighbours',
            ``min ||a W_prev + b W_next - W||`` over all of the block's synthesized tensors jointly (per tensor
            with ``scalars="tensor"``; on ``a + b = 1`` for the convex rule), so that the converted block
            starts as the nearest neighbour mix to what it replaced: the start for *trained* weights (fine-tuning
            a pretrained model). On fresh weights the neighbours explain little of a block and the fit is near
            zero (a warning names such blocks): in a network without residual connections that silences them
            (docs/quality.md measures it), so ``(0.5, 0.5)`` stays the default. ``"fit"`` needs tensors with
            values (a ConfigError names a block on the meta device). A policy's own
            :meth:`~replace_wrap.Policy.initial_scalars` (e.g. :class:`~replace_wrap.Similarity`'s) comes
            first; loading a checkpoint replaces the start with the saved scalars (nothing is fitted there).
        adapt_shapes: Shape-adapting fusion. ``True``: a neighbour tensor of another shape is sliced or
            zero-padded to the replaced block's shape (kernel dimensions centred), a side without a
            counterpart contributes zeros, and a tensor without a counterpart on either side stays the
            block's own parameter. ``False``: a block is only replaced when both neighbours supply every
            tensor with exactly its shape (otherwise it is skipped).
        fast_path: Compute the layers of replaced blocks that have a layer kernel (``nn.Linear``,
            ``nn.Conv1d/2d/3d``, Hugging Face ``Conv1D``, RMS norms, and any registered with
            :func:`replace_wrap.register_layer_kernel`) with a custom backward that takes the input gradient as
            a frozen layer would plus the scalars' gradient, without a weight-gradient product (RMS norms:
            their own forward, the scalars' gradient from sampled rows only).
            ``False``: every tensor goes through ordinary autograd (the reference path). Outputs are the same
            either way.
        ab_grad_sample: How layers with a layer kernel (``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face
            ``Conv1D``, RMS norms: rows) take the scalars' gradient. ``"auto"`` (default): each step, of a layer's ``N`` units
            (rows of a linear layer's input, output positions of a convolution: batch items times spatial
            positions) ``m = max(16, ceil(N / 64))`` are drawn uniformly and the sum over them is rescaled by
            ``N / m``, an unbiased estimate; a layer with ``N <= 16`` units takes the exact gradient. Its
            variance is ``N^2 (1/m - 1/N) S^2`` (``S^2``: the variance of the units' terms), so the relative
            standard error is at most ``cv / sqrt(16) = cv / 4`` (``cv``: the terms' coefficient of variation) and the
            variance added to the exact sum at most ``63`` times that sum's own unit-to-unit variance (see
            :mod:`replace_wrap.synthesis.estimators`). The cost is one thin product of ``m`` units instead of a
            full weight gradient. ``"exact"`` or ``None``: the exact gradient from every unit (``None`` is how
            it is stored, and what configs written by replace_wrap 0.1/0.2 mean by it). A fraction in ``(0, 1)``:
            ``m = ceil(f * N)`` units (no minimum); ``1.0`` is exact. A fraction needs ``fast_path=True``;
            with ``neighbour_grad="coupled"`` the gradient stays exact (the neighbours need the full weight
            gradient anyway), and RMS norms take it through autograd. Layers without a kernel take the exact
            gradient through autograd:
            :func:`replace_wrap.report` lists each replaced layer's path and estimator.
        recompute: Keep only the inputs of each replaced block for the backward and recompute the block
            there (``torch.utils.checkpoint``): less memory than freezing the block, one more forward of it.
            As with any checkpointing, BatchNorm statistics of the block update in both passes.
        plain_state_dict: ``True`` (default): ``model.state_dict()`` also holds each replaced tensor's current
            synthesized value under its original key, so every checkpoint written from the converted model
            (``save_pretrained``, ``Trainer.save_model``, ``torch.save(model.state_dict())``) also loads as a
            plain model of the original architecture that predicts the same (see :mod:`replace_wrap.io.plain`).
            ``False``: the state dict holds the scalars instead of the replaced tensors only (smaller; only
            ``replace_wrap.load`` / ``replace_wrap.from_pretrained`` can load it).
        version: Format version of this config, stored with saved conversions.

    Example:
        >>> cfg = ReplaceConfig(rule="convex", scalars="tensor")
        >>> cfg.neighbour_grad
        'detached'
    """

    rule: str = "linear"
    scalars: str = "block"
    neighbour_grad: str = "detached"
    keep_original: bool = False
    init: tuple[float, float] | str = (0.5, 0.5)
    adapt_shapes: bool = True
    fast_path: bool = True
    ab_grad_sample: float | str | None = "auto"
    recompute: bool = False
    plain_state_dict: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        from .synthesis.rules import get_rule  # late: the rule registry is filled when synthesis is imported

        if not isinstance(self.rule, str):
            raise ConfigError(f"rule must be a rule name (str), got {self.rule!r}")
        try:
            rule = get_rule(self.rule)
        except RegistryError as exc:  # the user passed a config value: report it as a config error
            raise ConfigError(str(exc)) from None
        _check_choice("scalars", self.scalars, _SCALARS)
        _check_choice("neighbour_grad", self.neighbour_grad, _NEIGHBOUR_GRAD)
        if not isinstance(self.keep_original, bool):
            raise ConfigError(f"keep_original must be True or False, got {self.keep_original!r}")
        if not isinstance(self.adapt_shapes, bool):
            raise ConfigError(f"adapt_shapes must be True or False, got {self.adapt_shapes!r}")
        self._check_init(rule)
        for flag in ("fast_path", "recompute", "plain_state_dict"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        self._check_sample()
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"config version {self.version!r} is not supported by this replace_wrap (supports "
                f"{CONFIG_VERSION}; ReplaceConfig.from_dict reads versions 1 and 2 too); upgrade replace_wrap to read it"
            )

    def _check_init(self, rule: Any) -> None:
        init = self.init
        if isinstance(init, str):
            if init != "fit":
                raise ConfigError(f"init must be 'fit' or two finite numbers (a, b), got {init!r}")
            rule.check_init(UNFITTED_INIT)
            return
        if (
            not isinstance(init, (tuple, list))
            or len(init) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in init)
            or not all(math.isfinite(v) for v in init)
        ):
            raise ConfigError(f"init must be 'fit' or two finite numbers (a, b), got {init!r}")
        object.__setattr__(self, "init", (float(init[0]), float(init[1])))
        rule.check_init(self.init)

    @property
    def constant_init(self) -> tuple[float, float]:
        """The ``(a, b)`` a block starts from when its scalars are not fitted: ``init`` itself when it is a
        pair, ``(0.5, 0.5)`` for ``"fit"`` (where a load supplies the scalars, nothing is fitted)."""
        return UNFITTED_INIT if isinstance(self.init, str) else self.init

    def _check_sample(self) -> None:
        sample = self.ab_grad_sample
        if sample is None or sample == "auto":
            return
        if sample == "exact":
            object.__setattr__(self, "ab_grad_sample", None)  # stored as None, as 0.1/0.2 configs store it
            return
        if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0.0 < sample <= 1.0:
            raise ConfigError(
                f"ab_grad_sample must be 'auto', 'exact' (or None) or a fraction in (0, 1], got {sample!r}; "
                "e.g. 1/16"
            )
        if float(sample) == 1.0:
            object.__setattr__(self, "ab_grad_sample", None)
            return
        if not self.fast_path:
            raise ConfigError(
                f"ab_grad_sample={sample!r} needs fast_path=True (the generic path always computes the exact "
                "gradient); drop ab_grad_sample or set fast_path=True"
            )
        object.__setattr__(self, "ab_grad_sample", float(sample))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for saving next to weights."""
        return dataclasses.asdict(self) | {"init": self.init if isinstance(self.init, str) else list(self.init)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplaceConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ReplaceConfig field(s) {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("init"), list):
            data["init"] = tuple(data["init"])
        version = data.get("version", 1)
        if version == 1:
            # Version 1 (replace_wrap 0.1/0.2) defaulted to the exact scalar gradient: a record without the
            # field meant exact, and null still does. Migrated to the current version with that meaning kept.
            data.setdefault("ab_grad_sample", None)
        if version in (1, 2):
            # Versions 1 and 2 started every block at init, (0.5, 0.5) unless stated (records always state it).
            data.setdefault("init", UNFITTED_INIT)
            data["version"] = CONFIG_VERSION
        return cls(**data)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


_CURRENT: ContextVar[ReplaceConfig | None] = ContextVar("replace_wrap_config", default=None)


def current_config() -> ReplaceConfig:
    """The :class:`ReplaceConfig` of the ``convert``/``plan`` call that is consulting a policy.

    Policies read it to account exactly for what the conversion will do (rule, scalars, shape adaptation).
    Outside such a call, the default config.

    Example:
        >>> current_config().rule
        'linear'
    """
    return _CURRENT.get() or ReplaceConfig()


@contextmanager
def using_config(config: ReplaceConfig) -> Iterator[None]:
    """Make ``config`` what :func:`current_config` returns inside the ``with`` block (set by the plan)."""
    token = _CURRENT.set(config)
    try:
        yield
    finally:
        _CURRENT.reset(token)
