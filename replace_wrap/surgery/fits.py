"""Least-squares fits of a block against its neighbours: the fitted initial scalars (``init="fit"``) and the
redundancy score of the policies (:class:`~replace_wrap.Budget`, :class:`~replace_wrap.Similarity`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ..config import ReplaceConfig
from ..errors import ConfigError
from ..synthesis.maths import Fit, fit_coefficients
from ..synthesis.mixing import read_neighbour
from ..synthesis.rules import get_rule
from .matching import BlockMatch

__all__ = ["block_fits", "fitted_scalars", "relative_residual", "scalars_from_checkpoint", "start_coefficients"]


def block_fits(match: BlockMatch, n_sets: int, affine: bool) -> list[Fit]:
    """Least-squares ``(a, b)`` of a block's tensors against its neighbours': one joint fit, or one per tensor."""
    own = [t.layer._parameters[t.name] for t in match.synthesized]
    with torch.no_grad():
        # The neighbours as the synthesis sees them: tensors of another shape sliced / zero-padded to the
        # block's, an absent side as zeros. The maps are linear, so this fit is the synthesis' own.
        sources = [t.sources() for t in match.synthesized]
        prev = [p for p, _ in sources]
        nxt = [n for _, n in sources]
        if n_sets == 1:
            return [fit_coefficients(own, prev, nxt, affine=affine)]
        return [fit_coefficients(o, p, n, affine=affine) for o, p, n in zip(own, prev, nxt)]


def relative_residual(fits: Sequence[Fit]) -> float:
    """``sqrt(sum residual / sum ||target||^2)`` over fits: how far the block is from any neighbour mix."""
    return Fit(0.0, 0.0, sum(f.residual for f in fits), sum(f.norm for f in fits)).relative


# --- where a replaced block's scalars start ----------------------------------------------------------------

# Set while a conversion is replayed for loading (ConversionRecord.apply): the checkpoint supplies every
# scalar, so a fit would be wasted work, and impossible on the meta tensors Hugging Face builds models with.
_SCALARS_LOADED: ContextVar[bool] = ContextVar("replace_wrap_scalars_loaded", default=False)


@contextmanager
def scalars_from_checkpoint() -> Iterator[None]:
    """Inside the block, every replaced block starts at the config's constant ``init`` (a load overwrites it)."""
    token = _SCALARS_LOADED.set(True)
    try:
        yield
    finally:
        _SCALARS_LOADED.reset(token)


def start_coefficients(
    match: BlockMatch, n_sets: int, cfg: ReplaceConfig, path: str
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """How a replaced block's scalars start under ``cfg.init``: ``(coefficients or None, how)``.

    ``None`` means the rule's parameters for ``cfg.constant_init``; ``how`` is what the report shows:
    ``"fit"``, or the constant (with why nothing was fitted, when a fit was asked for).

    Raises:
        ConfigError: ``init="fit"`` and the block or a neighbour has no values (meta device).
    """
    constant = f"({cfg.constant_init[0]:g}, {cfg.constant_init[1]:g})"
    if not isinstance(cfg.init, str):
        return None, constant
    if _SCALARS_LOADED.get():
        return None, f"{constant}, then the checkpoint's scalars"
    tensors = [t.layer._parameters[t.name] for t in match.synthesized]
    tensors += [read_neighbour(layer, t.name) for t in match.synthesized for layer in (t.prev_layer, t.next_layer)
                if layer is not None]
    if any(t is not None and t.is_meta for t in tensors):
        raise ConfigError(
            f"init='fit' fits the scalars of block {path!r} to its own tensors, but it or a neighbour is on the "
            "meta device (no values to fit). Convert after the weights are loaded or materialized, or pass "
            "init=(a, b)."
        )
    return fitted_scalars(match, n_sets, cfg.rule), "fit"


def fitted_scalars(match: BlockMatch, n_sets: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares ``(a, b)`` of each scalar set, shaped ``(n_sets,)`` (constrained as ``rule`` needs)."""
    fits = block_fits(match, n_sets, get_rule(rule).affine)
    return torch.tensor([f.a for f in fits]), torch.tensor([f.b for f in fits])
