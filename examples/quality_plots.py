"""The plots of docs/quality.md (matplotlib, PNG), drawn from the quality study's run log."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from quality_report import ABLATION, MAIN, SCRATCH, TRANSFER, _higher, _select, compare  # noqa: E402

__all__ = ["plot_all"]

_LABEL = {"digits_vit": "digits ViT: test accuracy (%)", "digits_cnn": "digits CNN: test accuracy (%)",
          "char_lm": "byte-level GPT-2: test bits per byte"}


def _unit(task: str) -> float:
    return 100.0 if _higher(task) else 1.0


def plot_length(rows: list[dict], path: Path) -> None:
    """Metric against training steps, end-to-end and every=2, mean ± std over seeds."""
    fig, axes = plt.subplots(1, len(MAIN), figsize=(4.2 * len(MAIN), 3.4))
    for ax, task in zip(axes, MAIN):
        for variant, label, color in (("end-to-end", "end-to-end", "C0"), ("default", "every=2 (default)", "C3")):
            xs, ms, sds = [], [], []
            for scale in sorted({float(r["scale"]) for r in rows if r["task"] == task and r["kind"] == "scratch"}):
                runs = _select(rows, "scratch", task, variant, scale)
                if not runs:
                    continue
                values = [_unit(task) * r["value"] for r in runs.values()]
                xs.append(next(iter(runs.values()))["steps"])
                ms.append(statistics.mean(values))
                sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=label, color=color)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("optimizer steps (log scale)")
        ax.set_title(_LABEL[task], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Training length: mean ± std over seeds (lower is better for bits per byte)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gain_panel(ax: plt.Axes, rows: list[dict], task: str, variants: tuple[str, ...], reference: str) -> None:
    """Horizontal bars: paired gain over ``reference`` (positive = better), ± 2 standard errors."""
    names, gains, errs = [], [], []
    ref = _select(rows, "scratch", task, reference)
    for v in variants:
        c = compare(task, _select(rows, "scratch", task, v), ref) if v != reference else None
        if c is None:
            continue
        sign = 1.0 if _higher(task) else -1.0
        names.append(v)
        gains.append(sign * _unit(task) * c["mean"])
        errs.append(0.0 if math.isnan(c["se"]) else 2 * _unit(task) * c["se"])
    y = range(len(names))
    colors = ["C2" if g - e > 0 else "C3" if g + e < 0 else "C7" for g, e in zip(gains, errs)]
    ax.barh(list(y), gains, xerr=errs, color=colors, capsize=3)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    unit = "accuracy points" if _higher(task) else "bits per byte saved"
    ax.set_xlabel(f"gain over {reference} ({unit})", fontsize=8)
    ax.set_title(task, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def plot_gains(rows: list[dict], path: Path, variants: tuple[str, ...], reference: str, title: str) -> None:
    fig, axes = plt.subplots(1, len(MAIN), figsize=(4.6 * len(MAIN), 0.45 * len(variants) + 1.6))
    for ax, task in zip(axes, MAIN):
        _gain_panel(ax, rows, task, variants, reference)
    fig.suptitle(title + " (paired over seeds, bars ± 2 SE; green/red: outside seed noise)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_transfer(rows: list[dict], path: Path) -> None:
    """Fine-tuned metric against updated parameters, one point per variant (mean ± std)."""
    fig, axes = plt.subplots(1, len(MAIN), figsize=(4.6 * len(MAIN), 3.8))
    for ax, task in zip(axes, MAIN):
        for i, v in enumerate(TRANSFER):
            runs = _select(rows, "transfer", task, v)
            if not runs:
                continue
            values = [_unit(task) * r["value"] for r in runs.values()]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            x = next(iter(runs.values()))["trainable"] / 1e3
            ax.errorbar([x], [statistics.mean(values)], yerr=[sd], marker="os^vDP*X"[i % 8], capsize=3, ls="none",
                        label=v, color=f"C{i}")
        ax.set_xlabel("updated parameters (thousands)")
        ax.set_title(_LABEL[task].replace(":", ", fine-tuned:"), fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle("Transfer: pretrain on one split, fine-tune on the other (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(rows: list[dict], folder: Path) -> list[str]:
    """Write every plot into ``folder``; return a line per file."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if any(float(r["scale"]) != 1.0 for r in rows):
        plot_length(rows, folder / "quality_length.png")
        written.append(str(folder / "quality_length.png"))
    plot_gains(rows, folder / "quality_scratch.png", SCRATCH, "end-to-end", "From scratch: gain over end-to-end")
    plot_gains(rows, folder / "quality_ablation.png", ABLATION, "default", "Ablations: gain over every=2 (default)")
    written += [str(folder / "quality_scratch.png"), str(folder / "quality_ablation.png")]
    if any(r["kind"] == "transfer" for r in rows):
        plot_transfer(rows, folder / "quality_transfer.png")
        written.append(str(folder / "quality_transfer.png"))
    return [f"wrote {w}" for w in written]
