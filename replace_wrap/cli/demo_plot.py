"""The demo's picture: accuracy over training time, the replaced blocks' a, b, and the ratios at a glance."""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["plot_demo"]

_E2E, _REP = "#4C72B0", "#DD8452"  # the two runs keep their colours in every panel


def plot_demo(results: dict[str, dict[str, Any]], s: Any, path: str | os.PathLike[str]) -> None:
    """Write the demo's figure to ``path`` (PNG, or any format matplotlib infers from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display and never opens a window
    import matplotlib.pyplot as plt

    e2e, rep = results["end-to-end"], results["replaced"]
    with plt.style.context("seaborn-v0_8-whitegrid"):
        fig, (ax_acc, ax_ab, ax_ratio) = plt.subplots(
            1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1.15, 1.15, 0.8]}
        )
        _accuracy_panel(ax_acc, e2e, rep, s)
        _scalars_panel(ax_ab, rep, s)
        _ratio_panel(ax_ratio, e2e, rep)
        n_rep = len(rep["scalars"])
        fig.suptitle(
            f"convert(model, every={s.every}) on a ViT of {s.depth} blocks: {n_rep} replaced, "
            f"{rep['trainable'] / e2e['trainable']:.2f}x the trainable parameters, "
            f"test accuracy {100 * rep['accuracy']:.1f}% (end-to-end {100 * e2e['accuracy']:.1f}%)",
            fontsize=14,
            fontweight="bold",
            x=0.01,
            ha="left",
        )
        fig.text(
            0.01,
            0.905,
            f"scikit-learn digits, same seed ({s.seed}), data order and budget: {s.epochs} "
            f"epochs = {e2e['steps']} steps of {s.batch_size} images; each run in a fresh process on "
            f"{s.threads} thread(s)",
            fontsize=10.5,
            color="#555555",
            ha="left",
        )
        fig.tight_layout(rect=(0, 0, 1, 0.9))
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _accuracy_panel(ax: Any, e2e: dict[str, Any], rep: dict[str, Any], s: Any) -> None:
    for run, colour, label in ((e2e, _E2E, "end-to-end"), (rep, _REP, f"replaced (every={s.every})")):
        t, acc = zip(*run["curve"])
        pct = [100 * a for a in acc]
        ax.plot(t, pct, "-o", color=colour, lw=2.2, ms=4, label=f"{label}: {pct[-1]:.1f}%")
        ax.plot(t[-1], pct[-1], "o", color=colour, ms=9, mec="white", mew=1.5)  # where each run ends
    ax.set_title("Test accuracy over training time", loc="left", fontweight="bold")
    ax.set_xlabel("training time (s, optimizer steps only)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", frameon=True, title="final test accuracy")


def _scalars_panel(ax: Any, rep: dict[str, Any], s: Any) -> None:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    blocks = list(rep["scalars"].items())
    for k, (path, traj) in enumerate(blocks):
        colour = cmap(0.1 + 0.75 * k / max(1, len(blocks) - 1))
        steps = range(len(traj))
        a = [ab[0] for ab in traj]
        b = [ab[1] for ab in traj]
        ax.plot(steps, a, "-", color=colour, lw=2.2, label=f"{path}: a={a[-1]:.3f}, b={b[-1]:.3f}")
        ax.plot(steps, b, "--", color=colour, lw=2.2)
    ax.axhline(0.5, color="#999999", lw=1, ls=":", zorder=0)
    ax.plot([], [], "-", color="#444444", label="a (solid): weight on block i-1")
    ax.plot([], [], "--", color="#444444", label="b (dashed): weight on block i+1")
    ax.set_title(r"Replaced blocks: $W_i = a_i W_{i-1} + b_i W_{i+1}$", loc="left", fontweight="bold")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("scalar value (both start at 0.5)")
    ax.legend(loc="best", fontsize=9, frameon=True)


def _ratio_panel(ax: Any, e2e: dict[str, Any], rep: dict[str, Any]) -> None:
    rows = [
        ("trainable\nparameters", rep["trainable"] / e2e["trainable"]),
        ("weights + grads\n+ AdamW state", rep["state_bytes"] / e2e["state_bytes"]),
        ("training time\n(wall)", rep["train_time_s"] / e2e["train_time_s"]),
        ("training time\n(CPU)", rep["train_cpu_s"] / e2e["train_cpu_s"]),
        ("test accuracy", rep["accuracy"] / e2e["accuracy"] if e2e["accuracy"] else float("nan")),
    ]
    labels, values = zip(*rows)
    y = range(len(rows))[::-1]
    ax.barh(list(y), values, color=_REP, height=0.55)
    ax.axvline(1.0, color=_E2E, lw=2.2)
    ax.text(0.98, len(rows) - 0.45, "end-to-end = 1", color=_E2E, fontsize=9, va="bottom", ha="right")
    for yi, v in zip(y, values):
        ax.text(
            max(v, 1.0) + 0.03 if abs(v - 1.0) < 0.1 else v + 0.03,
            yi,
            f"{v:.2f}x",
            va="center",
            fontweight="bold",
        )
    ax.set_yticks(list(y), labels)
    ax.set_xlim(0, max(1.25, max(v for v in values if not math.isnan(v)) + 0.25))
    ax.set_ylim(-0.6, len(rows) - 0.1)
    ax.set_title("Replaced / end-to-end", loc="left", fontweight="bold")
    ax.set_xlabel("ratio (lower is cheaper; accuracy: higher is better)")
    ax.grid(axis="y", visible=False)
