"""Where does a training step's time and memory go? torch.profiler over a few steps of one bench variant.

    bash .ci/venv python examples/bench_profile_step.py vit_small_patch16_224 --variant replace --size 96
    bash .ci/venv python examples/bench_profile_step.py vit_small_patch16_224 --variant replace --against freeze

Prints the top operators by self CPU time (and by self memory). With ``--against VARIANT`` it profiles both
variants in one process and prints, per operator, the self CPU time per step of each and the difference,
largest first: what the first variant adds on top of the second. Uses the same model builder and variants as
``replace-wrap bench``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import replace_wrap
from replace_wrap.cli.bench_child import SAMPLE, VARIANTS, _loss, build_model, example_input


def _prepared(args: argparse.Namespace, variant: str) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = build_model(args.model, args.size, 10, {})
    spec = VARIANTS[variant]
    if spec["kind"] == "freeze":
        for b in replace_wrap.plan(model, every=2).replaced:
            for rel in b.synthesized:
                model.get_parameter(f"{b.path}.{rel}").requires_grad_(False)
    elif spec["kind"] == "convert":
        opts = {k: (args.sample if v == SAMPLE else v) for k, v in spec["options"].items()}
        replace_wrap.convert(model, every=2, **opts)
    x = example_input(model, {"batch": args.batch, "seq": args.seq, "input_shape": [3, args.size, args.size]}, "cpu")
    opt = torch.optim.AdamW(replace_wrap.param_groups(model, weight_decay=0.01), lr=1e-4)
    return model.train(), x, opt


def _profile(args: argparse.Namespace, variant: str) -> Any:
    model, x, opt = _prepared(args, variant)

    def step() -> None:
        with record_function("forward"):
            loss = _loss(model(x))
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(args.steps):
            step()
    return prof


def _difference(args: argparse.Namespace, mine: Any, base: Any) -> str:
    def per_step(prof: Any) -> dict[str, tuple[float, int]]:
        return {e.key: (e.self_cpu_time_total / args.steps / 1e3, e.count // args.steps) for e in prof.key_averages()}

    a, b = per_step(mine), per_step(base)
    total_a, total_b = sum(v[0] for v in a.values()), sum(v[0] for v in b.values())
    lines = [f"self CPU per step: {args.variant} {total_a:.1f} ms, {args.against} {total_b:.1f} ms "
             f"(x {total_a / total_b:.3f})", "",
             f"| operator | {args.variant} ms (calls) | {args.against} ms (calls) | difference ms |", "|---|---:|---:|---:|"]
    keys = sorted(set(a) | set(b), key=lambda k: -(a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0]))
    for k in keys[: args.rows]:
        (ta, ca), (tb, cb) = a.get(k, (0.0, 0)), b.get(k, (0.0, 0))
        lines.append(f"| {k[:60]} | {ta:.2f} ({ca}) | {tb:.2f} ({cb}) | {ta - tb:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    training = [v for v in VARIANTS if not v.startswith("infer")]
    p.add_argument("--variant", default="replace", choices=training)
    p.add_argument("--against", default=None, choices=training, help="print the per-operator difference to this one")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence of a language model")
    p.add_argument("--sample", type=float, default=1 / 16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--sort", default="self_cpu_time_total")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = _profile(args, args.against) if args.against else None  # the baseline first, as the bench orders them
    prof = _profile(args, args.variant)
    print(f"{args.model} {args.size}px batch {args.batch}, variant {args.variant}, {args.steps} steps, "
          f"{torch.get_num_threads()} thread(s)")
    if base is not None:
        print(_difference(args, prof, base))
    else:
        print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
