"""Page faults per training step of freeze and replace, one model per process or both in one process.

    bash .ci/venv python examples/bench_faults.py hf:llama --set num_hidden_layers=12 --set hidden_size=512 \\
        --set intermediate_size=1536 --set num_attention_heads=8 --set num_key_value_heads=8 \\
        --set vocab_size=8192 --seq 256 --batch 8 --threads 1

Minor page faults (``resource.getrusage``) are the operating system handing the process fresh pages: under
glibc's default allocator, memory the heap trimmed or unmapped is faulted in again page by page on its next use,
which a time measurement counts. They are counted, not timed, so the machine's load does not move them.
Three processes: freeze alone, replace alone, and both in one process stepping in turn (the paired
measurement of ``replace-wrap bench --paired``), each counted per phase (forward, backward, optimizer step)
as a median over the counted steps. Where the two models share a heap, each one's faults depend on what the
other's step left mapped, which is what this separates.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import replace_wrap
from replace_wrap.cli.bench import _parse_sets
from replace_wrap.cli.bench_child import _loss, build_model, example_input

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_floor.py, next to this file

from bench_floor import model_arguments  # noqa: E402

PHASES = ("forward", "backward", "optimizer")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def make(variant: str, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(model, optimizer, input)`` of ``variant`` (``freeze``: the blocks every=2 replaces, frozen)."""
    torch.manual_seed(0)
    model = build_model(args.model, args.size, 10, _parse_sets(args.set))
    x = example_input(model, {"batch": args.batch, "seq": args.seq, "input_shape": [3, args.size, args.size]}, "cpu")
    if variant == "freeze":
        for block in replace_wrap.plan(model, every=2).replaced:
            model.get_submodule(block.path).requires_grad_(False)
    else:
        replace_wrap.convert(model, every=2)
    opt = torch.optim.AdamW(replace_wrap.param_groups(model, weight_decay=0.01), lr=1e-4)
    return model.train(), opt, x


def count(variants: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """In this process: every variant's faults per phase, median over ``args.steps`` steps after the warm-up."""
    built = {v: make(v, args) for v in variants}
    seen: dict[str, dict[str, list[int]]] = {v: {p: [] for p in PHASES} for v in variants}
    for step in range(args.warmup + args.steps):
        order = variants if step % 2 == 0 else variants[::-1]  # neither always follows the other
        for v in order:
            model, opt, x = built[v]
            f0 = _faults()
            loss = _loss(model(x))
            f1 = _faults()
            loss.backward()
            f2 = _faults()
            opt.step()
            opt.zero_grad(set_to_none=True)
            f3 = _faults()
            if step >= args.warmup:
                for phase, n in zip(PHASES, (f1 - f0, f2 - f1, f3 - f2)):
                    seen[v][phase].append(n)
    return {v: {p: statistics.median(n) for p, n in phases.items()} for v, phases in seen.items()}


def main(argv: list[str] | None = None) -> int:
    p = model_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--steps", type=int, default=5, help="counted steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: count these variants, print JSON
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(count(args.child.split(","), args)))
        return 0
    rows = []
    for variants, where in ((["freeze"], "alone"), (["replace"], "alone"), (["freeze", "replace"], "together")):
        argv_child = [a for a in (argv if argv is not None else sys.argv[1:])]
        out = subprocess.run([sys.executable, __file__, *argv_child, "--child", ",".join(variants)],
                             check=True, capture_output=True, text=True).stdout
        for v, phases in json.loads(out.strip().splitlines()[-1]).items():
            rows.append((v, where, phases))
    print(f"{args.model}: minor page faults per step (median of {args.steps}), {args.threads} thread(s)")
    print("| variant | process | forward | backward | optimizer | step |")
    print("|---|---|---:|---:|---:|---:|")
    for v, where, ph in rows:
        total = sum(ph.values())
        print(f"| {v} | {where} | {ph['forward']:.0f} | {ph['backward']:.0f} | {ph['optimizer']:.0f} | {total:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
