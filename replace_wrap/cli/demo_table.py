"""The demo's table: accuracy, trainable parameters, time and memory of the two runs, side by side."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table"]


def format_table(results: dict[str, dict[str, Any]], s: Any) -> str:
    """The comparison table: one row per measurement, end-to-end vs replaced, and their ratio."""
    e2e, rep = results["end-to-end"], results["replaced"]
    mib = 2.0**20
    rows = [
        (
            "test accuracy",
            f"{100 * e2e['accuracy']:.1f}%",
            f"{100 * rep['accuracy']:.1f}%",
            ratio(rep["accuracy"], e2e["accuracy"])
            + f" ({100 * (rep['accuracy'] - e2e['accuracy']):+.1f} pt)",
        ),
        (
            "trainable parameters",
            f"{e2e['trainable']:,}",
            f"{rep['trainable']:,}",
            ratio(rep["trainable"], e2e["trainable"]),
        ),
        (
            "training time (wall)",
            f"{e2e['train_time_s']:.1f} s",
            f"{rep['train_time_s']:.1f} s",
            ratio(rep["train_time_s"], e2e["train_time_s"]),
        ),
        (
            "training time (CPU)",
            f"{e2e['train_cpu_s']:.1f} s",
            f"{rep['train_cpu_s']:.1f} s",
            ratio(rep["train_cpu_s"], e2e["train_cpu_s"]),
        ),
        (
            "weights + grads + AdamW state",
            f"{e2e['state_bytes'] / mib:.2f} MiB",
            f"{rep['state_bytes'] / mib:.2f} MiB",
            ratio(rep["state_bytes"], e2e["state_bytes"]),
        ),
        (
            "peak RSS (process)",
            f"{e2e['peak_rss_bytes'] / mib:.0f} MiB",
            f"{rep['peak_rss_bytes'] / mib:.0f} MiB",
            ratio(rep["peak_rss_bytes"], e2e["peak_rss_bytes"]),
        ),
        (
            "peak RSS above baseline",
            f"{above_baseline(e2e) / mib:.1f} MiB",
            f"{above_baseline(rep) / mib:.1f} MiB",
            ratio(above_baseline(rep), above_baseline(e2e)),
        ),
    ]
    header = ("", "end-to-end", f"every={s.every}", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"same budget: {s.epochs} epochs = {e2e['steps']} steps of {s.batch_size} images, seed {s.seed}"
    )
    lines.append(f"replaced: {rep['report']}")
    for path, traj in rep["scalars"].items():
        a, b = traj[-1]
        lines.append(f"  {path}: a = {a:.3f}, b = {b:.3f} (both started at {traj[0][0]:.2f})")
    lines += [
        "time: optimizer steps only (evaluation excluded); CPU time is the less noisy one on a busy machine.",
        "memory: weights + grads + AdamW state counted tensor by tensor after the last step. Peak RSS is each",
        "  run's own subprocess's high-water mark (getrusage); 'above baseline' leaves out what was resident",
        "  before the model was built (interpreter, libraries, data). For a model this small, activations and",
        "  library code paged in during training dominate RSS, so its ratio stays near 1.",
    ]
    return "\n".join(lines)


def above_baseline(run: dict[str, Any]) -> int:
    return max(0, run["peak_rss_bytes"] - run["base_rss_bytes"])


def ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}x" if old else "n/a"
