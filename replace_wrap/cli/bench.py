"""``replace-wrap bench``: what does replacing blocks save on *my* model?

Runs the model end-to-end, with the blocks that the policy would replace frozen (``requires_grad=False``,
the floor a replaced block is measured against), and replaced (generic autograd, the fast path with the exact
scalar gradient, the defaults of ``convert(model, every=2)``, the memory-lean mode), each in a fresh process,
interleaved over several rounds so that drift in the machine's load hits every variant alike. Prints a table
with, per variant:

- trainable parameters;
- step time: median, min and max over all timed steps of all rounds (wall clock), and the median process
  CPU time per step (all threads; with ``--threads 1`` it hardly depends on what else runs on the machine);
- peak memory: on CPU the child's RSS high-water mark over the timed steps (reset after the warm-up steps)
  minus its RSS once the libraries were imported, so model, optimizer state and step memory count and the
  several hundred MiB of mapped libraries do not; on CUDA ``torch.cuda.max_memory_allocated``;
- params+saved: the parameters plus what autograd keeps from one forward for the backward, counted by
  storage (deterministic, allocator-independent);
- and the ratios of step time and memory against end-to-end and against freezing;
- with ``--paired``, two more processes that hold every training variant and time them a step of each in
  turn, the order rotated by one each step: the variants then share every moment of the machine's load, so
  those ratios (medians of the per-step ratios, wall clock and process CPU time) hold on a busy machine. The
  two processes build the variants in opposite orders (a model's place in a process moves its step time
  by about 1%) and share the ``steps x rounds`` paired steps. The ratio to freeze comes with a
  distribution-free 95% confidence interval for that median (from 6 paired steps up; 20 or more give a
  usefully narrow one).
- with ``--lockstep`` instead, the same ratios from one process per training variant, the processes stepped
  in turn (:mod:`.bench_lockstep`): the variants share the machine's moments but no heap and no build order.

Models: ``timm:NAME`` (or a bare timm name), ``hf:MODEL_TYPE`` (a transformers config for that model type:
a decoder language model such as ``hf:llama`` or ``hf:gpt2`` is built with ``AutoModelForCausalLM`` and fed
``--seq`` random tokens, anything else with ``AutoModelForImageClassification``; ``--set key=value`` sets config
fields) or ``package.module:factory`` (called with the ``--set`` values as keyword arguments). Nothing is
downloaded. ``--compile`` runs every variant under ``torch.compile`` and reports dynamo's graph, graph-break
and recompile counts.

Example:
    replace-wrap bench vit_small_patch16_224 --size 96 --batch 16 --every 2 --rounds 3
    replace-wrap bench hf:vit --set hidden_size=768 --set num_hidden_layers=12 --set num_attention_heads=12 \\
        --set intermediate_size=3072 --size 64 --batch 16 --json
    replace-wrap bench hf:gpt2 --set n_layer=12 --set n_embd=384 --set n_head=6 --set vocab_size=8192 \\
        --seq 128 --batch 8 --paired
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from .bench_child import DEFAULT_VARIANTS, VARIANTS, BenchError, build_model, paired_order
from .bench_lockstep import lockstep_times
from .bench_report import aggregate, format_table, median_interval

__all__ = [
    "DEFAULT_VARIANTS", "VARIANTS", "BenchError", "add_parser", "build_model", "format_table", "median_interval",
    "run_bench",
]


# --- command line ------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "bench",
        help="measure step time and peak memory: end-to-end vs frozen blocks vs replaced blocks",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("model", help="timm:NAME (or a bare timm name), hf:MODEL_TYPE, or package.module:factory")
    p.add_argument("--size", type=int, default=96, help="input image size (default 96)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--input-shape", default=None,
                   help="per-item input shape, comma separated (default 3,SIZE,SIZE); e.g. 8 for a vector model")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the head and the random targets")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model option (timm kwarg, HF config field, factory kwarg); VALUE is read as JSON if it can be")
    pol = p.add_mutually_exclusive_group()
    pol.add_argument("--every", type=int, default=None, help="replace every k-th block (default 2)")
    pol.add_argument("--pattern", default=None, help="replace the blocks whose path matches this regex")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence of a language model (default 128)")
    p.add_argument("--sample", type=float, default=1 / 16, help="ab_grad_sample of the replace-sampled variant (1/16)")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (default inductor)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--steps", type=int, default=10, help="timed steps per process (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per variant, interleaved (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype for the forward (float32: no autocast)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--paired", action="store_true",
                   help="also time every training variant a step of each in turn, in two processes that "
                        "build them in opposite orders (steps x rounds steps each in all): ratios that hold "
                        "on a machine whose load varies")
    p.add_argument("--lockstep", action="store_true",
                   help="as --paired, but every training variant in a process of its own, the processes stepped "
                        "in turn: no shared heap or build order between the variants")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per child process")
    p.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the child processes, e.g. GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 "
                        "(glibc then returns freed memory at once, so the RSS peak is the live memory's; the "
                        "step times then include faulting that memory in again: time without it)")
    return p


def main_bench(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand; returns the exit status."""
    try:
        result = run_bench(
            args.model, size=args.size, batch=args.batch, input_shape=_parse_shape(args.input_shape),
            num_classes=args.num_classes, sets=_parse_sets(args.set), every=args.every, pattern=args.pattern,
            sample=args.sample, variants=[v.strip() for v in args.variants.split(",") if v.strip()],
            steps=args.steps, warmup=args.warmup, rounds=args.rounds, device=args.device, threads=args.threads,
            dtype=args.dtype, progress=not args.no_progress, timeout=args.timeout, paired=args.paired, lockstep=args.lockstep,
            seq=args.seq, compile=args.compile, child_env=_parse_env(args.child_env),
        )
    except BenchError as exc:
        print(f"replace-wrap bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise BenchError(f"--set expects KEY=VALUE with KEY an identifier, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--child-env expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _parse_shape(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        shape = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"--input-shape expects comma-separated integers, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise BenchError(f"--input-shape expects positive integers, got {text!r}")
    return shape


# --- the parent: schedule children, aggregate ----------------------------------------------------------------


def run_bench(
    model: str,
    *,
    size: int = 96,
    batch: int = 16,
    input_shape: list[int] | None = None,
    num_classes: int = 10,
    sets: dict[str, Any] | None = None,
    every: int | None = None,
    pattern: str | None = None,
    sample: float = 1 / 16,
    variants: list[str] | tuple[str, ...] = DEFAULT_VARIANTS,
    steps: int = 10,
    warmup: int = 2,
    rounds: int = 3,
    device: str = "cpu",
    threads: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
    timeout: float = 1800,
    paired: bool = False,
    lockstep: bool = False,
    seq: int = 128,
    compile: bool = False,
    child_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run every variant ``rounds`` times, each in a fresh process, interleaved; return the aggregate.

    Returns:
        A JSON-ready dict: ``spec`` (the arguments), ``variants`` (one entry per variant with
        ``trainable``, ``step_ms`` {median, min, max}, ``peak_mib``, ``delta_mib``, ``convert_s`` and the
        ratios ``vs_end_to_end`` / ``vs_freeze``), ``runs`` (every child's raw result) and ``loadavg``
        (1-minute load averages sampled before each child). With ``paired=True`` every training variant
        is also timed a step of each in turn, ``steps * rounds`` steps each, split between two processes
        that build and step the variants in opposite orders (``paired_orders``), into ``paired``, each
        row's ``paired_ms`` and the ratios' ``paired``, ``paired_cpu`` and ``paired_ci`` entries.
        ``lockstep=True`` fills the same entries from one process per training variant, the processes
        stepped in turn (:mod:`.bench_lockstep`; ``lockstep_pids``: each variant's process); ``paired_mode``
        says which (``"shared"``, ``"lockstep"``, ``None``: neither).

    Raises:
        BenchError: For an unknown variant or invalid numbers, or when a child fails (with its stderr).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise BenchError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    repeated = sorted({v for v in variants if variants.count(v) > 1})
    if repeated:  # one result per name: a repeat would pair steps of different moments
        raise BenchError(f"variant(s) {repeated} given more than once in --variants; name each once")
    for name, value, low in (("steps", steps, 1), ("rounds", rounds, 1), ("batch", batch, 1), ("size", size, 1),
                             ("warmup", warmup, 0), ("seq", seq, 1)):
        if not isinstance(value, int) or value < low:
            raise BenchError(f"--{name} must be an integer >= {low}, got {value!r}")
    if paired and lockstep:
        raise BenchError("--paired and --lockstep both time the variants in turn; choose one (--lockstep: a "
                         "process per variant)")
    if not 0 < sample <= 1:
        raise BenchError(f"--sample must be a fraction in (0, 1], got {sample!r}")
    spec = {
        "model": model, "size": size, "batch": batch, "input_shape": input_shape or [3, size, size],
        "num_classes": num_classes, "sets": sets or {}, "every": every, "pattern": pattern, "sample": sample,
        "steps": steps, "warmup": warmup, "device": device, "threads": threads, "dtype": dtype, "seq": seq,
        "compile": compile, "child_env": child_env or {},
    }
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    loads: list[float] = []
    training = [v for v in variants if not VARIANTS[v]["kind"].startswith("infer")]
    total_paired = steps * rounds
    # two paired processes, the variants built and stepped in opposite orders: where a model sits in a process
    # matters (two identical freeze models in one process differed by 1% by which was built first)
    orders: list[list[str]] = []
    if paired and training:
        orders = [training, training[::-1]] if total_paired > 1 and len(training) > 1 else [training]
    total, done = rounds * len(variants) + len(orders) + (1 if lockstep and training else 0), 0
    for r in range(rounds):
        for name in paired_order(list(variants), r):  # rotated per round
            _progress(progress, done, total, f"round {r + 1}/{rounds}: {name}")
            loads.append(_loadavg())
            runs[name].append(_spawn(dict(spec, variant=name), timeout))
            done += 1
    pair_times: dict[str, dict[str, list[float]]] | None = None
    processes: dict[str, int] = {}
    for i, order in enumerate(orders):
        _progress(progress, done, total, f"paired {i + 1}/{len(orders)}: {len(training)} variants in one process")
        loads.append(_loadavg())
        share = (total_paired + len(orders) - 1 - i) // len(orders)  # the steps split between the processes
        got = _spawn(dict(spec, variant="paired", paired=order, steps=share), timeout * len(training))["paired"]
        pair_times = pair_times or {name: {"step_ms": [], "cpu_ms": []} for name in training}
        for name in got:  # each process's steps in turn: position i of every list is one paired step
            for key in ("step_ms", "cpu_ms"):
                pair_times[name][key] += got[name][key]
        done += 1
    if lockstep and training:
        _progress(progress, done, total, f"lockstep: {len(training)} processes stepped in turn")
        loads.append(_loadavg())
        pair_times, processes = lockstep_times(spec, training, total_paired, timeout)
        done += 1
    _progress(progress, done, total, "done", end=True)
    mode = "lockstep" if lockstep and training else "shared" if orders else None
    return {"spec": spec, "variants": aggregate(runs, pair_times), "runs": runs, "paired": pair_times,
            "paired_orders": orders, "paired_mode": mode,
            "lockstep_pids": processes, "loadavg": loads, "environment": _environment(device)}


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "replace_wrap.cli.bench_child"]
    env = dict(os.environ, **spec.get("child_env", {}))
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"variant {spec['variant']!r} took longer than {timeout:.0f} s; raise --timeout or "
                         "lower --steps") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BenchError(f"variant {spec['variant']!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on every platform
        return float("nan")


def _environment(device: str) -> dict[str, Any]:
    import platform

    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "machine": platform.machine()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _progress(enabled: bool, done: int, total: int, what: str, end: bool = False) -> None:
    if not enabled:
        return
    width = 24
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<40}")
    if end:
        sys.stderr.write("\n")
    sys.stderr.flush()
