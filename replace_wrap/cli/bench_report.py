"""The report of ``replace-wrap bench``: the children's results aggregated into ratios, and the table.

Step times are medians over steps; the paired ratios are medians of per-step ratios (each step of one variant
against the same paired step of the reference), with a distribution-free confidence interval for that median.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from .bench_child import VARIANTS

__all__ = ["aggregate", "format_table", "median_interval"]


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def aggregate(runs: dict[str, list[dict[str, Any]]], paired: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per variant from the children's results (``runs``) and the paired steps (``paired``), with
    the ratios against end-to-end and freeze (training rows) or the original model (inference rows)."""
    rows = []
    for name, results in runs.items():
        times = [t for res in results for t in res["step_ms"]]
        cpu = [t for res in results for t in res["cpu_ms"]]
        rows.append({
            "paired_ms": _stats(paired[name]["step_ms"]) if paired and name in paired else None,
            "variant": name,
            "trainable": results[0]["trainable"],
            "step_ms": _stats(times),
            "cpu_ms": _stats(cpu),
            "round_medians_ms": [statistics.median(res["step_ms"]) for res in results],
            "peak_mib": statistics.median(res["peak_mib"] for res in results),
            "delta_mib": statistics.median(res["delta_mib"] for res in results),
            "saved_mib": results[0].get("saved_mib"),
            "convert_s": results[0].get("convert_s"),
            "memory": results[0]["memory"],
        })
    by_name = {row["variant"]: row for row in rows}
    for row in rows:
        infer = VARIANTS[row["variant"]]["kind"].startswith("infer")
        # inference rows compare with the original model's inference, training rows with the baselines
        refs = (("infer-original", "vs_original"),) if infer else (
            ("end-to-end", "vs_end_to_end"), ("freeze", "vs_freeze"))
        for key in ("vs_original", "vs_end_to_end", "vs_freeze"):
            row[key] = None
        for ref, key in refs:
            base = by_name.get(ref)
            step_ratios = _paired_ratios(paired, row["variant"], ref, "step_ms")
            cpu_ratios = _paired_ratios(paired, row["variant"], ref, "cpu_ms")
            row[key] = None if base is None else {
                "step": row["step_ms"]["median"] / base["step_ms"]["median"],
                "cpu": row["cpu_ms"]["median"] / base["cpu_ms"]["median"],
                # a step of each variant in turn: the median of the per-step ratios cancels the load's drift
                "paired": None if step_ratios is None else statistics.median(step_ratios),
                "paired_cpu": None if cpu_ratios is None else statistics.median(cpu_ratios),
                "paired_ci": None if step_ratios is None else median_interval(step_ratios),
                "peak": row["peak_mib"] / base["peak_mib"],
                "delta": row["delta_mib"] / base["delta_mib"] if base["delta_mib"] > 0 else None,
                "saved": row["saved_mib"] / base["saved_mib"] if row["saved_mib"] and base["saved_mib"] else None,
            }
    return rows


def _paired_ratios(paired: dict[str, Any] | None, name: str, ref: str, key: str) -> list[float] | None:
    """The per-step ratios of ``name`` to ``ref`` (step ``i`` of each is one paired step), or ``None``."""
    if not paired or name not in paired or ref not in paired:
        return None
    return [a / b for a, b in zip(paired[name][key], paired[ref][key])]


def median_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """A distribution-free confidence interval for the median of ``values``: ``[v_(k), v_(n+1-k)]`` of the
    sorted values, ``k`` the largest with ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``.

    For independent draws of one distribution it covers the median with probability at least ``level``.
    ``None`` when ``n`` is too small for that (fewer than 6 values at 95%). The paired steps are that only
    approximately: neighbouring steps share the machine's load, and the two paired processes differ a little
    (by about 1%), so read the interval as the spread of the steps, not as an exact guarantee.
    """
    n = len(values)
    tail, k = 0.0, 0
    while k < n:  # tail = P(X <= k - 1) for X ~ Binomial(n, 1/2)
        tail_next = tail + math.comb(n, k) / 2 ** n
        if tail_next > (1 - level) / 2:
            break
        tail, k = tail_next, k + 1
    if k == 0:
        return None
    ordered = sorted(values)
    return [ordered[k - 1], ordered[n - k]]


def format_table(result: dict[str, Any]) -> str:
    """Render :func:`run_bench`'s result as a Markdown table with a header line and a load-average footer."""
    spec, rows = result["spec"], result["variants"]
    policy = f"pattern {spec['pattern']!r}" if spec["pattern"] else f"every={spec['every'] or 2}"
    mem = rows[0]["memory"]
    shape = result["runs"][rows[0]["variant"]][0].get("input") or [spec["batch"], *spec["input_shape"]]
    head = (f"{spec['model']} · input {'x'.join(map(str, shape))} · {policy} · "
            f"{spec['steps']} steps x {len(result['runs'][rows[0]['variant']])} rounds · {spec['device']} · "
            f"memory: {mem}")
    lines = [head, "",
             "| variant | trainable | step ms median (min-max) | x e2e | x freeze | CPU ms/step | x freeze "
             "| peak MiB | x e2e | x freeze | params+saved MiB | x freeze |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    paired = any(row["paired_ms"] for row in rows)
    if paired:
        lines[2] += " paired ms | x e2e | x freeze [95% CI] | paired CPU x freeze |"
        lines[3] += "---:|---:|---:|---:|"
    for row in rows:
        e2e, frz = row["vs_end_to_end"] or {}, row["vs_freeze"] or {}
        st = row["step_ms"]
        extra = ""
        if paired:
            extra = (f" {row['paired_ms']['median']:.1f} | {_ratio(e2e.get('paired'))} | {_ratio(frz.get('paired'))}"
                     f"{_interval(frz.get('paired_ci'))} | {_ratio(frz.get('paired_cpu'))} |"
                     if row["paired_ms"] else " - | - | - | - |")
        lines.append(
            f"| {row['variant']} | {_count(row['trainable'])} | {st['median']:.1f} ({st['min']:.1f}-{st['max']:.1f}) "
            f"| {_ratio(e2e.get('step'))} | {_ratio(frz.get('step'))} | {row['cpu_ms']['median']:.1f} "
            f"| {_ratio(frz.get('cpu'))} | {row['peak_mib']:.0f} "
            f"| {_ratio(e2e.get('peak'))} | {_ratio(frz.get('peak'))} "
            f"| {'-' if row['saved_mib'] is None else format(row['saved_mib'], '.1f')} | {_ratio(frz.get('saved'))} |"
            + extra
        )
    mode = result.get("paired_mode")
    if paired and mode:
        lines += ["", "paired steps: " + (
            "lockstep, one process per variant, stepped in turn (steps x rounds each)" if mode == "lockstep"
            else "two processes holding every variant, built in opposite orders (steps x rounds in all)")]
    loads = result["loadavg"]
    if loads:
        lines += ["", f"1-min load average before each process: min {min(loads):.2f}, median "
                      f"{statistics.median(loads):.2f}, max {max(loads):.2f}"]
    if _lowered_mmap_threshold(spec.get("child_env", {}).get("GLIBC_TUNABLES", "")):
        lines.append("time: with glibc's mmap threshold lowered every larger allocation is faulted in again each "
                     "step, in every variant alike, which pulls the time ratios toward 1; for step times as a "
                     "training script sees them run without --child-env (the peak column needs it)")
    merged, original = (next((r for r in rows if r["variant"] == v), None) for v in ("infer-merged", "infer-original"))
    if merged and original:
        lines.append(f"inference (no_grad forward): merged model {merged['step_ms']['median']:.1f} ms vs original "
                     f"{original['step_ms']['median']:.1f} ms (x {merged['vs_original']['step']:.3f})")
    compiled = [(r["variant"], run["compile"]) for r in rows for run in result["runs"][r["variant"]][:1] if run.get("compile")]
    if compiled:
        lines.append("torch.compile (dynamo counters per process): " + "; ".join(
            f"{v} {c['graphs']} graph(s), {c['breaks']} break(s), {c['recompiles']} recompile(s)" for v, c in compiled))
    converts = [row["convert_s"] for row in rows if row.get("convert_s") is not None]
    if converts:
        lines.append(f"convert: {max(converts):.2f} s")
    return "\n".join(lines)


def _lowered_mmap_threshold(tunables: str) -> bool:
    # glibc's own threshold adapts up to 32 MiB on 64-bit; a fixed one below that maps (and faults in) every
    # larger allocation afresh, a raised one (4 GiB: nothing mapped) does the opposite
    match = re.search(r"glibc\.malloc\.mmap_threshold=(0[xX][0-9a-fA-F]+|\d+)", tunables)
    return match is not None and int(match.group(1), 0) < 32 * 1024 * 1024


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _interval(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.2f}-{ci[1]:.2f}]"
