"""Where does a training step's time and memory go? torch.profiler over a few steps of one bench variant.

    bash .ci/venv python examples/bench_profile_step.py vit_small_patch16_224 --variant replace --size 96

Prints the top operators by self CPU time (and by self memory), so that two variants (e.g. ``freeze`` and
``replace``) can be compared line by line. Uses the same model builder and variants as
``replace-wrap bench``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import replace_wrap
from replace_wrap.cli.bench_child import SAMPLE, VARIANTS, _loss, build_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--variant", default="replace-sampled", choices=[v for v in VARIANTS if not v.startswith("infer")])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sample", type=float, default=1 / 16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--sort", default="self_cpu_time_total")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, args.size, 10, {})
    spec = VARIANTS[args.variant]
    if spec["kind"] == "freeze":
        for b in replace_wrap.plan(model, every=2).replaced:
            for rel in b.fused:
                model.get_parameter(f"{b.path}.{rel}").requires_grad_(False)
    elif spec["kind"] == "convert":
        opts = {k: (args.sample if v == SAMPLE else v) for k, v in spec["options"].items()}
        replace_wrap.convert(model, every=2, **opts)
    x = torch.randn(args.batch, 3, args.size, args.size)
    opt = torch.optim.AdamW(replace_wrap.param_groups(model, weight_decay=0.01), lr=1e-4)
    model.train()

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
    print(f"{args.model} {args.size}px batch {args.batch}, variant {args.variant}, {args.steps} steps")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
