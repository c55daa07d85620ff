"""What ``convert`` says about the conversion it made: a log line for the record, warnings to act on.

One place decides what is said (so that no option is silently ignored): the summary, blocks selected but
skipped, layers that cannot take the configured estimator, how the scalars started, and recompute with running
statistics. All of it goes to the ``"replace_wrap"`` logger (info: the record; warning: something to act
on), except the recompute note, a ``UserWarning`` (it changes what training computes).
"""

from __future__ import annotations

import logging
import warnings

from ..config import ReplaceConfig
from ..report import LayerRoute
from .plan import Plan

__all__ = ["tell"]

logger = logging.getLogger("replace_wrap")

# A fitted start below this (|a| + |b| of every scalar set) scales a block down to near nothing: said at convert.
_SMALL_FIT = 0.25


def tell(planned: Plan, cfg: ReplaceConfig) -> None:
    """Say what the conversion did: a log line for the record, warnings for what the user should act on."""
    rep = planned.report
    logger.info("replace_wrap.convert: %s", rep.summary())
    if rep.skipped:
        shown = "; ".join(f"{b.path}: {b.reason}" for b in rep.skipped[:3])
        more = f" (and {len(rep.skipped) - 3} more)" if len(rep.skipped) > 3 else ""
        logger.warning(
            "replace_wrap.convert: %d selected block(s) could not be replaced and stay as they are: %s%s. "
            "replace_wrap.report(model) lists every block.", len(rep.skipped), shown, more,
        )
    _tell_routes(planned, cfg)
    starts = rep.init_summary()
    if starts:
        logger.info("replace_wrap.convert: %s", starts)
    small = [
        b for b in rep.replaced
        if b.init == "fit" and b.scalars and max(abs(a) + abs(c) for a, c in zip(b.scalars["a"], b.scalars["b"])) < _SMALL_FIT
    ]
    if small:
        shown = ", ".join(f"{b.path} (a={b.scalars['a'][0]:.3g}, b={b.scalars['b'][0]:.3g})" for b in small[:3])
        logger.warning(
            "replace_wrap.convert: init='fit' starts %d block(s) near zero, |a| + |b| < %g: %s%s. Their neighbours "
            "explain little of them (fresh, untrained weights?); in a network without residual connections such "
            "blocks pass almost no signal. For untrained weights start at init=(0.5, 0.5), the default.",
            len(small), _SMALL_FIT, shown, " ..." if len(small) > 3 else "",
        )
    if cfg.recompute:
        with_stats = sorted({
            t.candidate.path for t in planned.targets for m in t.candidate.block.modules()
            if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
        })
        if with_stats:
            warnings.warn(
                f"recompute=True replays the forward of the replaced blocks {with_stats[:4]} in the backward, and "
                "their normalization layers update their running statistics in both passes (twice per step, "
                "as with any activation checkpointing); convert with recompute=False to keep them exact.",
                UserWarning,
                stacklevel=3,
            )


def _tell_routes(planned: Plan, cfg: ReplaceConfig) -> None:
    """Say which replaced layers do not take the sampled fast path, so that no option is silently ignored."""
    rep = planned.report
    routes = [(b.path, r) for b in rep.replaced for r in b.layers]
    summary = rep.layer_summary()
    if summary:
        logger.info("replace_wrap.convert: %s", summary)

    def kinds(found: list[tuple[str, LayerRoute]]) -> str:
        shown = sorted({f"{r.layer} ({r.route}: {r.estimator})" for _, r in found})
        path, r = found[0]
        return "; ".join(shown) + f"; e.g. {path}{'.' if r.path else ''}{r.path}"

    # Layers holding a matrix pay a full weight-gradient product per step for an exact scalar gradient: those
    # are named. Norm layers' per-channel tensors cost far less that way (LayerNorm's fused backward nothing
    # extra; an RMS norm without its row kernel, an activation-sized product) and are only in the report.
    heavy = {
        (t.candidate.path, f.layer_path) for t in planned.targets for f in t.candidate.match.synthesized
        if len(f.shape) >= 2
    }
    if isinstance(cfg.ab_grad_sample, float):  # an explicit fraction: every layer it cannot apply to is named
        exact = [(p, r) for p, r in routes if (p, r.path) in heavy and not r.estimator.startswith("sampled")]
        if exact:
            logger.warning(
                "replace_wrap.convert: ab_grad_sample=%r does not apply to %d of %d replaced layers with weight "
                "matrices, which take the exact scalar gradient: %s. replace_wrap.report(model) lists each layer.",
                cfg.ab_grad_sample, len(exact), len(routes), kinds(exact),
            )
        return
    costly = [(path, r) for path, r in routes if r.generic and (path, r.path) in heavy]
    if costly and cfg.fast_path:
        logger.warning(
            "replace_wrap.convert: %d replaced layer(s) with weight matrices take the generic path (a full weight "
            "gradient per step, exact scalar gradient): %s. Register a layer kernel for them "
            "(replace_wrap.register_layer_kernel) to take the fast path; replace_wrap.report(model) lists each "
            "layer's path.", len(costly), kinds(costly),
        )
