"""Does the default estimator cost accuracy? ``convert(model, every=2)`` against the exact scalar gradient.

Runs the tasks of ``quality_tasks.py`` (digits ViT, digits CNN with stages, a byte-level GPT-2 on the Python
standard library's sources) for several seeds, every variant of a seed from the same weights and data order,
and prints mean +- standard deviation per task and variant, then the difference of each variant to the first
one with its standard error: within seed noise means ``|difference| <= 2 standard errors``.

    bash .ci/venv python examples/bench_accuracy.py --seeds 3                # the table in docs/benchmarks.md
    bash .ci/venv python examples/bench_accuracy.py --quick --seeds 1        # a smoke run (tests run this)
    bash .ci/venv python examples/bench_accuracy.py --tasks char_lm --variants exact,default,freeze
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality_tasks.py, next to this file

import quality_tasks  # noqa: E402


def differences(rows: list[dict], reference: str) -> list[str]:
    """Per task and variant: mean difference to ``reference`` and whether it is within seed noise."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        ref = [r["value"] for r in rows if r["task"] == task and r["variant"] == reference]
        for variant in dict.fromkeys(r["variant"] for r in rows if r["task"] == task):
            if variant == reference:
                continue
            mine = [r["value"] for r in rows if r["task"] == task and r["variant"] == variant]
            diff = statistics.mean(mine) - statistics.mean(ref)
            if len(mine) > 1 and len(ref) > 1:
                se = math.sqrt(statistics.variance(mine) / len(mine) + statistics.variance(ref) / len(ref))
                verdict = "within seed noise" if abs(diff) <= 2 * se else "outside seed noise"
                lines.append(f"{task}: {variant} - {reference} = {diff:+.4f} (standard error {se:.4f}): {verdict}")
            else:
                lines.append(f"{task}: {variant} - {reference} = {diff:+.4f} (one seed: no spread)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(quality_tasks.TASKS), help="comma-separated task names")
    p.add_argument("--variants", default="exact,default", help="comma-separated; the first is the reference")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="each task's short budget (a smoke run)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write every run's result to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [t for t in tasks if t not in quality_tasks.TASKS] + [v for v in variants if v not in quality_tasks.VARIANTS]
    if unknown:
        p.error(f"unknown task(s)/variant(s) {unknown}; tasks: {list(quality_tasks.TASKS)}, "
                f"variants: {list(quality_tasks.VARIANTS)}")
    t0 = time.perf_counter()
    rows = quality_tasks.compare(tasks, variants, seeds=args.seeds, quick=args.quick,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    budget = "quick budget" if args.quick else "full budget"
    print(f"{len(tasks)} task(s) x {len(variants)} variant(s) x {args.seeds} seed(s), {budget}, "
          f"{torch.get_num_threads()} thread(s), Python {rows[0]['python']}, {wall / 60:.1f} min in all\n")
    print(quality_tasks.format_table(rows))
    print()
    print("\n".join(differences(rows, variants[0])))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "wall_s": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
