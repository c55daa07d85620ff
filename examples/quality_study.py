"""Does replacement train as well? The study behind docs/quality.md: runs, tables and plots.

Four studies on the tasks of ``quality_tasks.py`` (digits ViT, digits CNN with stages, byte-level GPT-2 on the
Python standard library's sources), every number over seeds, every variant of a seed from the same initial
weights, data order, optimizer and schedule:

- ``scratch``: end-to-end, freeze / drop the blocks ``every=2`` replaces, ``every=2`` with the default and the
  exact scalar gradient, ``Budget`` / ``Similarity`` at the trainable fraction of ``every=2``, ``adapt_shapes``
  on the CNNs (``digits_cnn_deep``: four blocks per stage, stage-boundary blocks replaced or kept).
- ``ablation``: the method's open choices, each one option away from ``every=2`` (a separate scalar learning
  rate, ``scalars="tensor"``, coupled neighbour gradients, least-squares initialisation, the convex and EMA rules).
- ``length``: end-to-end and ``every=2`` at 1/4, 1/2 and 2x each task's budget (1x comes from ``scratch``).
- ``transfer``: pretrain on one split, fine-tune on another under a budget of updated parameters
  (``quality_transfer.py``: full, freeze, ``Every(2)``, ``Budget(redundancy)``, ``Similarity``, LoRA, learned).

Every run appends one JSON line to the log; a rerun skips the runs already there, so an interrupted study
resumes, and ``--shard i/n`` splits the pending runs between processes that share the log::

    bash .ci/venv python examples/quality_study.py run --log runs/quality.jsonl                  # everything
    bash .ci/venv python examples/quality_study.py run --log runs/quality.jsonl --shard 0/2 &    # two processes
    bash .ci/venv python examples/quality_study.py run --log runs/quality.jsonl --shard 1/2
    bash .ci/venv python examples/quality_study.py report --log runs/quality.jsonl --plots docs/assets
    bash .ci/venv python examples/quality_study.py run --quick --seeds 1 --tasks digits_cnn --log /tmp/q.jsonl

Each run uses one thread (``--threads``), so two processes on two cores do not disturb each other.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality_tasks.py and friends, next to this file

import quality_tasks as qt  # noqa: E402
import quality_transfer as qx  # noqa: E402

TASKS = ("digits_vit", "digits_cnn", "char_lm")
SCRATCH = ("end-to-end", "freeze", "drop", "default", "exact", "budget", "similarity")
SCRATCH_EXTRA = {"digits_cnn": ("adapt_shapes=False",)}
DEEP = ("end-to-end", "default", "offset1", "offset1, adapt_shapes=False", "budget at the adapt_shapes=False fraction")
ABLATION = ("scalar_lr x10", "scalars=tensor", "coupled", "lsq init", "rule=convex", "rule=ema")
LENGTH = ("end-to-end", "default")
SCALES = (0.25, 0.5, 2.0)
STUDIES = ("scratch", "ablation", "transfer", "length")


def plan_runs(studies: list[str], tasks: list[str], seeds: int, variants: list[str] | None = None) -> list[dict]:
    """The runs of ``studies`` in the order they are run: study by study, seed-major within a study."""
    runs: list[dict] = []
    for study in studies:
        for seed in range(seeds):
            for task in tasks:
                if study == "scratch":
                    todo = [(task, v, 1.0) for v in SCRATCH + SCRATCH_EXTRA.get(task, ())]
                    if task == "digits_cnn":
                        todo += [("digits_cnn_deep", v, 1.0) for v in DEEP]
                elif study == "ablation":
                    todo = [(task, v, 1.0) for v in ABLATION]
                elif study == "length":
                    todo = [(task, v, s) for s in SCALES for v in LENGTH]
                else:
                    todo = [(task, v, 1.0) for v in qx.TRANSFER_VARIANTS]
                kind = "transfer" if study == "transfer" else "scratch"
                runs += [{"kind": kind, "task": t, "variant": v, "seed": seed, "scale": s} for t, v, s in todo
                         if variants is None or v in variants]
    return runs


def key(run: dict, quick: bool) -> tuple:
    return (run["kind"], run["task"], run["variant"], run["seed"], float(run["scale"]), bool(quick))


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time (pretraining the same model in two shards would do the work twice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def execute(run: dict, quick: bool, cache: Path) -> dict:
    t0 = time.perf_counter()
    if run["kind"] == "transfer":
        with _locked(cache / f"{run['task']}-seed{run['seed']}.lock"):
            qx.pretrained(run["task"], run["seed"], quick, cache)
        row = qx.run_transfer(run["task"], run["variant"], run["seed"], quick, cache)
    else:
        row = qt.run(run["task"], run["variant"], run["seed"], quick, scale=run["scale"])
    row.update(kind=run["kind"], task=run["task"], scale=run["scale"], quick=quick,
               wall_s=time.perf_counter() - t0, threads=torch.get_num_threads())
    return row


def cmd_run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    runs = plan_runs(args.study.split(","), args.tasks.split(","), args.seeds,
                     args.variants.split(",") if args.variants else None)
    index, count = (int(v) for v in args.shard.split("/"))
    runs = [r for i, r in enumerate(runs) if i % count == index]
    done = {key(r, r.get("quick", False)) for r in read_log(log)}
    todo = [r for r in runs if key(r, args.quick) not in done]
    print(f"{len(runs)} run(s) in this shard, {len(runs) - len(todo)} already in {log}, {len(todo)} to run",
          flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else log.parent / "pretrained"
    for n, run in enumerate(todo, 1):
        row = execute(run, args.quick, cache)
        with open(log, "a") as f:  # one short line per append: shards sharing the log do not interleave
            f.write(json.dumps(row) + "\n")
        print(f"[{n}/{len(todo)}] {row['kind']} {row['task']} x{row['scale']:g} {row['variant']} seed {row['seed']}: "
              f"{row['value']:.4f} ({row['wall_s']:.0f} s)", flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import quality_report  # matplotlib: only for the report

    rows = [r for r in read_log(Path(args.log)) if bool(r.get("quick", False)) == args.quick]
    print(quality_report.report(rows, Path(args.plots) if args.plots else None))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the studies (resumable)")
    r.add_argument("--study", default=",".join(STUDIES), help=f"comma-separated, of {', '.join(STUDIES)}")
    r.add_argument("--tasks", default=",".join(TASKS))
    r.add_argument("--variants", default=None, help="only these variants (comma-separated)")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--quick", action="store_true", help="each task's short budget (a smoke run)")
    r.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th pending run from i")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--log", default="runs/quality.jsonl")
    r.add_argument("--cache", default=None, help="pretrained weights (default: next to the log)")
    rep = sub.add_parser("report", help="tables (Markdown) and plots from the log")
    rep.add_argument("--log", default="runs/quality.jsonl")
    rep.add_argument("--plots", default=None, help="write the PNG plots into this folder")
    rep.add_argument("--quick", action="store_true", help="report the quick runs")
    args = p.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
