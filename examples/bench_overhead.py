"""The fixed cost of a replaced layer: what one costs beyond its arithmetic, on layers too small to compute much.

    bash .ci/venv python examples/bench_overhead.py                 # linear and convolution layers
    bash .ci/venv python examples/bench_overhead.py --kind conv --blocks 25 --repeats 15

A stack of tiny residual blocks (one ``nn.Linear(16, 16)`` on 8 or 64 rows, or one 3x3 ``nn.Conv2d(8, 8)`` each), converted with
``every=2`` and nothing else, against the same stack with those blocks frozen (``requires_grad=False``). A step
is one forward and backward; at these sizes the products take microseconds, so the difference per replaced
layer is what the replaced layer's path costs in Python and operator calls (the layer kernel, its sample, its
estimator's small operations): the part of the step time that does not shrink with the model. Big models
hide it (ViT-S/16 at 96 px: 20 replaced layers in an 800 ms step); small ones show it.

With ``--accelerator-route`` the layers compute as they do on a GPU, where the estimator never reads the
scalars on the host: its operator count is the number of small calls (most of them kernel launches there) a
replaced layer adds on an accelerator. With ``--device cuda`` (a GPU machine) the same stacks run there, where
a step of such layers is bound by kernel launches: the fixed cost on a GPU.

The two variants are stepped in alternating order, ``--repeats`` times ``--steps`` steps each; the table gives
the median step of each and the median per replaced layer of the paired differences, with its spread
(min-max over the repeats). On shared cores the times drift by tens of percent between processes; the last
column does not: the operators a step calls directly (``torch.profiler``), replace minus freeze, per
replaced layer.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import replace_wrap

# kind -> (input shape, layer). 8 rows are fewer than the estimator's minimum sample of 16: exact, one thin
# product; 64 rows are sampled (16 of them), as a layer in training is; the convolution's 128 output
# positions are sampled too.
SIZES = {
    "linear": ((8, 16), lambda: nn.Linear(16, 16)),
    "linear-sampled": ((64, 16), lambda: nn.Linear(16, 16)),
    "conv": ((2, 8, 8, 8), lambda: nn.Conv2d(8, 8, 3, padding=1)),
}


class Block(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.layer = SIZES[kind][1]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.layer(x))


def models(kind: str, blocks: int) -> tuple[nn.Module, nn.Module, int]:
    """``(freeze, replace, replaced layers)``: the same stack, its would-be replaced blocks frozen or replaced."""
    torch.manual_seed(0)
    base = nn.Sequential(*[Block(kind) for _ in range(blocks)])
    plan = replace_wrap.plan(copy.deepcopy(base), every=2)
    freeze = copy.deepcopy(base)
    for block in plan.replaced:
        for rel in block.synthesized:
            freeze.get_parameter(f"{block.path}.{rel}").requires_grad_(False)
    replace = replace_wrap.convert(copy.deepcopy(base), every=2)
    return freeze, replace, len(plan.replaced)  # one layer a block


def operator_calls(model: nn.Module, x: torch.Tensor) -> int:
    """Operators one training step calls directly (``aten::`` calls not made inside another one), once warm
    (a first call also makes what later calls reuse)."""
    from torch.profiler import ProfilerActivity, profile

    model(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    return sum(
        1 for e in prof.events()
        if e.name.startswith("aten::") and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
    )


def measure(kind: str, blocks: int, steps: int, repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median step (us) of each variant and the median / min / max per-layer difference over paired repeats."""
    freeze, replace, layers = models(kind, blocks)
    freeze, replace = freeze.to(device), replace.to(device)
    x = torch.randn(SIZES[kind][0], device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(model: nn.Module) -> float:  # on a GPU: until the device is done (launches are asynchronous)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x).sum().backward()
        sync()
        return (time.perf_counter() - t0) / steps * 1e6

    for model in (freeze, replace):  # warm-up: first-call costs, caches, the allocator
        run(model)
    times: dict[str, list[float]] = {"freeze": [], "replace": []}
    for r in range(repeats):
        order = (("freeze", freeze), ("replace", replace))
        for name, model in order if r % 2 == 0 else order[::-1]:
            times[name].append(run(model))
    per_layer = [(rep - frz) / layers for frz, rep in zip(times["freeze"], times["replace"])]
    calls = (operator_calls(replace, x) - operator_calls(freeze, x)) / layers
    return {
        "calls": calls,
        "layers": layers, "freeze_us": statistics.median(times["freeze"]),
        "replace_us": statistics.median(times["replace"]), "per_layer_us": statistics.median(per_layer),
        "per_layer_min": min(per_layer), "per_layer_max": max(per_layer),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=[*SIZES, "all"], default="all")
    parser.add_argument("--blocks", type=int, default=25)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: on a GPU the layers take the accelerator "
                                                         "route by themselves, and a step is launch-bound")
    parser.add_argument("--accelerator-route", action="store_true",
                        help="compute as on an accelerator, where the kernels never read the scalars on the host "
                             "(a read would wait for the device): counts that route's operator calls on the CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.accelerator_route:
        from replace_wrap.synthesis import kernels

        kernels.scalars_on_host = lambda t: False  # what the layer kernels ask before reading a, b
    print("| layer | replaced layers | freeze step us | replace step us | per replaced layer us (min-max) "
          "| operator calls per replaced layer |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in SIZES if args.kind == "all" else (args.kind,):
        r = measure(kind, args.blocks, args.steps, args.repeats, args.device)
        print(f"| {kind} | {r['layers']} | {r['freeze_us']:.0f} | {r['replace_us']:.0f} | "
              f"{r['per_layer_us']:.0f} ({r['per_layer_min']:.0f}-{r['per_layer_max']:.0f}) | {r['calls']:.1f} |")


if __name__ == "__main__":
    main()
