"""Tables (Markdown) and plots (PNG) of the quality study from its run log (see ``quality_study.py``).

Differences between two variants are *paired* by seed: both start from the same initial weights and see the same
batches, so ``delta_s = value(variant, s) - value(reference, s)`` removes what the seed does to both; the table
gives the mean of ``delta_s`` and its standard error ``sd(delta) / sqrt(n)``. A difference is called within seed
noise when ``|mean| <= 2 standard errors``; with 3 seeds that is a coarse test, so the per-seed values are shown
too.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

__all__ = ["compare", "report"]

MAIN = ("digits_vit", "digits_cnn", "char_lm")
# The main tables use seeds 0-2 (every variant ran them); the start study (init_table) ran more seeds of fewer
# variants, and a plain MLP where the fitted start fails.
MAIN_SEEDS = 3
INIT_TASKS = ("digits_vit", "digits_cnn", "char_lm", "digits_mlp")
INIT = ("end-to-end", "default", "lsq init")
# The log's variant names, as the tables show them.
SHOWN = {"lsq init": 'init="fit"', "Every(2) lsq init": 'Every(2), init="fit"'}
SCRATCH = ("end-to-end", "freeze", "drop", "default", "exact", "budget", "similarity", "adapt_shapes=False")
DEEP = ("end-to-end", "default", "offset1", "offset1, adapt_shapes=False", "budget at the adapt_shapes=False fraction")
ABLATION = ("default", "scalar_lr x10", "scalars=tensor", "coupled", "lsq init", "rule=convex", "rule=ema")
TRANSFER = ("full", "freeze", "Every(2)", "Every(2) lsq init", "Budget(redundancy)", "Similarity", "LoRA (same budget)", "LoRA r=8", "learned")


def _shown(variant: str) -> str:
    return SHOWN.get(variant, variant)


def _higher(task: str) -> bool:
    return task != "char_lm"


def _fmt(task: str, v: float) -> str:
    return f"{100 * v:.2f}%" if _higher(task) else f"{v:.4f}"


def _fmt_delta(task: str, v: float) -> str:
    return f"{100 * v:+.2f} pt" if _higher(task) else f"{v:+.4f}"


def _select(rows: list[dict], kind: str, task: str, variant: str, scale: float = 1.0) -> dict[int, dict]:
    return {r["seed"]: r for r in rows if r["kind"] == kind and r["task"] == task and r["variant"] == variant
            and float(r["scale"]) == scale}


def compare(task: str, mine: dict[int, dict], ref: dict[int, dict]) -> dict[str, Any] | None:
    """Paired difference of ``mine`` to ``ref`` over their common seeds, with a verdict."""
    seeds = sorted(set(mine) & set(ref))
    if not seeds:
        return None
    d = [mine[s]["value"] - ref[s]["value"] for s in seeds]
    mean = statistics.mean(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    if len(d) < 2:
        verdict = "one seed"
    elif abs(mean) <= 2 * se:
        verdict = "within noise"
    else:
        verdict = "better" if (mean > 0) == _higher(task) else "worse"
    return {"mean": mean, "se": se, "n": len(d), "verdict": verdict}


def _stats(task: str, runs: dict[int, dict]) -> str:
    values = [runs[s]["value"] for s in sorted(runs)]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    if _higher(task):
        return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}%"
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _seeds(task: str, runs: dict[int, dict]) -> str:
    return ", ".join(_fmt(task, runs[s]["value"]) for s in sorted(runs))


def _delta(task: str, c: dict | None) -> str:
    if c is None:
        return "–"
    se = "" if math.isnan(c["se"]) else f" ± {_fmt_delta(task, c['se']).lstrip('+')}"
    return f"{_fmt_delta(task, c['mean'])}{se} ({c['verdict']})"


def _mean(runs: dict[int, dict], field: str) -> float:
    return statistics.mean(r[field] for r in runs.values())


def scratch_table(rows: list[dict], task: str, variants: tuple[str, ...], reference: str = "end-to-end") -> str:
    ref = _select(rows, "scratch", task, reference)
    full = next(iter(ref.values()))["trainable"] if ref else None
    lines = [f"| variant | trainable | metric (mean ± std) | per seed | Δ vs {reference} (paired ± SE) | train s / run |",
             "|---|---:|---:|---|---|---:|"]
    for v in variants:
        runs = _select(rows, "scratch", task, v)
        if not runs:
            continue
        trainable = next(iter(runs.values()))["trainable"]
        frac = f" ({trainable / full:.2f}×)" if full else ""
        delta = "reference" if v == reference else _delta(task, compare(task, runs, ref))
        lines.append(f"| {_shown(v)} | {trainable:,}{frac} | {_stats(task, runs)} | {_seeds(task, runs)} | {delta} | "
                     f"{_mean(runs, 'train_s'):.0f} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict], task: str) -> str:
    ref, e2e = _select(rows, "scratch", task, "default"), _select(rows, "scratch", task, "end-to-end")
    lines = ["| variant | trainable | metric (mean ± std) | per seed | Δ vs default | Δ vs end-to-end | train s / run |",
             "|---|---:|---:|---|---|---|---:|"]
    for v in ABLATION:
        runs = _select(rows, "scratch", task, v)
        if not runs:
            continue
        delta = "reference" if v == "default" else _delta(task, compare(task, runs, ref))
        lines.append(f"| {_shown(v)} | {next(iter(runs.values()))['trainable']:,} | {_stats(task, runs)} | {_seeds(task, runs)} "
                     f"| {delta} | {_delta(task, compare(task, runs, e2e))} | {_mean(runs, 'train_s'):.0f} |")
    return "\n".join(lines)


def ablation_verdicts(rows: list[dict]) -> str:
    """One line per ablation: its verdict against the default on every task."""
    lines = ["| variant | " + " | ".join(MAIN) + " | wins or ties on every task |", "|---|" + "---|" * (len(MAIN) + 1)]
    for v in ABLATION[1:]:
        cells, ok, wins = [], True, 0
        for task in MAIN:
            c = compare(task, _select(rows, "scratch", task, v), _select(rows, "scratch", task, "default"))
            cells.append(_delta(task, c))
            ok = ok and c is not None and c["verdict"] in ("better", "within noise")
            wins += c is not None and c["verdict"] == "better"
        lines.append(f"| {_shown(v)} | " + " | ".join(cells) + f" | {'yes' if ok and wins else 'ties only' if ok else 'no'} |")
    return "\n".join(lines)


def length_table(rows: list[dict], task: str) -> str:
    lines = ["| steps | end-to-end | every=2 (default) | Δ (paired ± SE) |", "|---:|---:|---:|---|"]
    for scale in sorted({float(r["scale"]) for r in rows if r["task"] == task and r["kind"] == "scratch"}):
        e2e, rep = _select(rows, "scratch", task, "end-to-end", scale), _select(rows, "scratch", task, "default", scale)
        if not e2e or not rep:
            continue
        steps = next(iter(e2e.values()))["steps"]
        lines.append(f"| {steps} ({scale:g}×) | {_stats(task, e2e)} | {_stats(task, rep)} | "
                     f"{_delta(task, compare(task, rep, e2e))} |")
    return "\n".join(lines)


def transfer_table(rows: list[dict], task: str) -> str:
    ref = _select(rows, "transfer", task, "full")
    full = next(iter(ref.values()))["trainable"] if ref else None
    lines = ["| variant | blocks (seed 0) | updated params | metric (mean ± std) | per seed | Δ vs full (paired ± SE) "
             "| memory MiB (saved) | time s |", "|---|---|---:|---:|---|---|---:|---:|"]
    for v in TRANSFER:
        runs = _select(rows, "transfer", task, v)
        if not runs:
            continue
        first = runs[min(runs)]
        frac = f" ({first['trainable'] / full:.2f}×)" if full else ""
        blocks = ", ".join(b.rsplit(".", 2)[-2] + "." + b.rsplit(".", 1)[-1] if b.count(".") > 1 else b
                           for b in first.get("blocks", [])) or (f"rank {first['lora_rank']}" if first.get("lora_rank")
                                                                  else "–")
        delta = "reference" if v == "full" else _delta(task, compare(task, runs, ref))
        mem = statistics.mean(r["memory"]["total"] for r in runs.values())
        saved = statistics.mean(r["memory"]["saved"] for r in runs.values())
        lines.append(f"| {_shown(v)} | {blocks} | {first['trainable']:,}{frac} | {_stats(task, runs)} | {_seeds(task, runs)} "
                     f"| {delta} | {mem:.1f} ({saved:.1f}) | {_mean(runs, 'time_s'):.0f} |")
    return "\n".join(lines)


def init_table(rows: list[dict], task: str) -> str:
    """End-to-end, the default start (0.5, 0.5) and the fitted start over every seed all three ran."""
    found = [_select(rows, "scratch", task, v) for v in INIT]
    common = set.intersection(*(set(f) for f in found if f)) if any(found) else set()
    rows = [r for r in rows if r["seed"] in common]
    e2e, default = _select(rows, "scratch", task, "end-to-end"), _select(rows, "scratch", task, "default")
    lines = ["| variant | seeds | metric (mean ± std) | per seed | Δ vs end-to-end (paired ± SE) | Δ vs default |",
             "|---|---:|---:|---|---|---|"]
    for v in INIT:
        runs = _select(rows, "scratch", task, v)
        if not runs:
            continue
        vs_e2e = "reference" if v == "end-to-end" else _delta(task, compare(task, runs, e2e))
        vs_default = "reference" if v == "default" else _delta(task, compare(task, runs, default))
        lines.append(f"| {_shown(v)} | {len(runs)} | {_stats(task, runs)} | {_seeds(task, runs)} | {vs_e2e} | "
                     f"{vs_default} |")
    return "\n".join(lines)


def wall_times(rows: list[dict]) -> str:
    by: dict[str, float] = {}
    for r in rows:
        study = r["kind"] if r["kind"] == "transfer" else (
            "length" if float(r["scale"]) != 1.0 else "ablation" if r["variant"] in ABLATION[1:] else "scratch")
        by[study] = by.get(study, 0.0) + r["wall_s"]
    return ", ".join(f"{k}: {v / 3600:.2f} h" for k, v in by.items()) + f"; all: {sum(by.values()) / 3600:.2f} h"


def report(rows: list[dict], plots: Path | None = None) -> str:
    """Every table of docs/quality.md from the log's rows (and the plots, written into ``plots``)."""
    out = [f"{len(rows)} runs; single-thread run time per study (summed): {wall_times(rows)}", ""]
    for task in INIT_TASKS:
        out += [f"## start: {task}", "", init_table(rows, task), ""]
    rows = [r for r in rows if r["seed"] < MAIN_SEEDS]
    out += [f"(the tables below: seeds 0-{MAIN_SEEDS - 1})", ""]
    for task in MAIN:
        out += [f"## scratch: {task}", "", scratch_table(rows, task, SCRATCH), ""]
    out += ["## scratch: digits_cnn_deep", "", scratch_table(rows, "digits_cnn_deep", DEEP), ""]
    for task in MAIN:
        out += [f"## ablation: {task}", "", ablation_table(rows, task), ""]
    out += ["## ablation verdicts vs default", "", ablation_verdicts(rows), ""]
    for task in (*MAIN, "digits_mlp"):
        out += [f"## length: {task}", "", length_table(rows, task), ""]
    for task in MAIN:
        out += [f"## transfer: {task}", "", transfer_table(rows, task), ""]
    for r in rows:
        if r["kind"] == "transfer" and r["variant"] == "learned":
            out.append(f"learned {r['task']} seed {r['seed']}: gates {r.get('gates')} -> {r.get('selection')}")
    if plots is not None:
        import quality_plots

        out += ["", *quality_plots.plot_all(rows, plots)]
    return "\n".join(out)
