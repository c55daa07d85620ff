"""The floor under the default's step time: what a replaced layer computes that a frozen one does not.

    bash .ci/venv python examples/bench_floor.py hf:vit --size 64 --batch 16 --threads 1
    bash .ci/venv python examples/bench_floor.py resnet50 --size 128 --batch 16 --threads 1

With no options a replaced layer synthesizes its weight ``W = a * W_prev + b * W_next`` twice per step (in the
forward, and again in the backward, so that no weight is held between the two: the memory goal) and the
default estimator of ``dL/da, dL/db`` takes one thin product of ``m = max(16, N/64)`` of the layer's ``N`` units
(rows or output positions). Everything else a frozen layer computes too. This times exactly those operations,
alone, at the shapes of every replaced linear and convolution layer of the model (the units counted by one
forward of the freeze model), and freeze's whole training step; ``1 + floor`` is the least that
``replace / freeze`` can be at the default settings, whatever the implementation around them costs.

Two floors: the operations each alone and warm in the caches (the arithmetic's least), and in the order of a
step with every layer's own tensors (each synthesis then reads its neighbours from memory once the replaced
weights outgrow the caches, as in training). The second is the one a training step can approach.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

import replace_wrap
from replace_wrap.cli.bench import _parse_sets
from replace_wrap.cli.bench_child import _loss, build_model, example_input
from replace_wrap.synthesis.estimators import sample_size


def _timed_ms(fn: Callable[[], Any], repeats: int, stat: Callable[[list[float]], float]) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stat(times) * 1e3


def replaced_layers(model: nn.Module, x: Any) -> list[dict[str, Any]]:
    """Every replaced block's synthesized layer weights: shape, units per step, inner size (freeze model)."""
    layers: list[dict[str, Any]] = []
    hooks = []
    for block in replace_wrap.plan(model, every=2).replaced:
        for rel in block.synthesized:
            weight = model.get_parameter(f"{block.path}.{rel}")
            if not rel.endswith("weight") or weight.dim() < 2:
                continue  # norms' and biases' vectors: nothing weight-sized
            weight.requires_grad_(False)
            layer = model.get_submodule(f"{block.path}.{rel.rsplit('.', 1)[0]}" if "." in rel else block.path)
            row = {"name": f"{block.path}.{rel}", "shape": tuple(weight.shape)}
            layers.append(row)

            def record(mod: nn.Module, args: tuple, out: Any, row: dict = row, weight: torch.Tensor = weight) -> None:
                if isinstance(mod, nn.modules.conv._ConvNd):  # units: output positions, inner: C/groups * kernel
                    row["units"], row["inner"] = out.shape[0] * math.prod(out.shape[2:]), weight[0].numel()
                else:  # units: rows of the input, all leading dimensions flattened
                    row["inner"] = args[0].shape[-1]
                    row["units"] = args[0].numel() // row["inner"]

            hooks.append(layer.register_forward_hook(record))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [r for r in layers if "units" in r]


def _thin(row: dict[str, Any], prev: torch.Tensor) -> Callable[[], Any] | None:
    """The estimator's thin product of a layer, or ``None`` when the layer uses every unit (exact)."""
    m = sample_size(row["units"], "auto")
    if m >= row["units"]:
        return None
    xs, w = torch.randn(m, row["inner"]), prev.reshape(prev.shape[0], -1)
    if w.shape[1] != row["inner"]:  # HF Conv1D stores (in, out)
        w = w.t()
    d = torch.randn(m, w.shape[0])
    return lambda: torch.dot((xs @ w.t()).reshape(-1), d.reshape(-1))


def floor(layers: list[dict[str, Any]], repeats: int) -> dict[str, tuple[float, float]]:
    """Milliseconds per step of the two syntheses and of the estimator's thin products, over all layers, two ways:

    - ``"warm"``: each operation alone, the fastest of ``repeats`` runs on the same tensors, which then sit in
      the caches: the least the arithmetic takes;
    - ``"step"``: as a step meets them: every layer's own tensors, the syntheses of all layers in forward order
      into one scratch buffer (as the layers do on the CPU), then in backward order each synthesis with its
      thin product; medians over ``repeats`` sweeps with and without the thin products, timed in turn (the
      products' time is the median of the per-repeat differences; 0 when no layer samples). Once a model's
      replaced weights outgrow the caches, each synthesis reads its neighbours from memory, as in training.
    """
    a, b = torch.tensor(0.5), torch.tensor(0.5)

    def synthesize(prev: torch.Tensor, nxt: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(prev, a, out=out).addcmul_(nxt, b)  # the layers' two passes (lean_layers._weight)

    synth = product = 0.0
    tensors = []
    scratch = torch.empty(max(math.prod(r["shape"]) for r in layers))
    for row in layers:
        prev, nxt = torch.randn(row["shape"]), torch.randn(row["shape"])
        out = scratch[: prev.numel()].view(row["shape"])
        thin = _thin(row, prev)
        tensors.append((prev, nxt, out, thin))
        synth += 2 * _timed_ms(lambda: synthesize(prev, nxt, out), repeats, min)
        if thin is not None:
            product += _timed_ms(thin, repeats, min)

    def sweep(products: bool) -> None:  # a step's forward, then its backward
        for prev, nxt, out, _ in tensors:
            synthesize(prev, nxt, out)
        for prev, nxt, out, thin in reversed(tensors):
            synthesize(prev, nxt, out)
            if products and thin is not None:
                thin()

    # the two sweeps in turn, so each thin-product time is the difference of two sweeps that met the same load
    sweep(False)
    sweep(True)
    synths, products = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sweep(False)
        t1 = time.perf_counter()
        sweep(True)
        t2 = time.perf_counter()
        synths.append(t1 - t0)
        products.append((t2 - t1) - (t1 - t0))
    sampled = any(thin is not None for *_, thin in tensors)
    step_product = max(statistics.median(products), 0.0) * 1e3 if sampled else 0.0
    return {"warm": (synth, product), "step": (statistics.median(synths) * 1e3, step_product)}


def model_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model options of ``replace-wrap bench`` that the bench examples share (the spec and its input)."""
    p.add_argument("model")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence of a language model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    return p


def main(argv: list[str] | None = None) -> int:
    p = model_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--steps", type=int, default=5, help="timed training steps of the freeze model")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats of each operation (the fastest counts)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = _parse_sets(args.set)
    torch.manual_seed(0)
    model = build_model(args.model, args.size, 10, sets)
    x = example_input(model, {"batch": args.batch, "seq": args.seq, "input_shape": [3, args.size, args.size]}, "cpu")
    layers = replaced_layers(model, x)  # also freezes them: the model is now the freeze baseline
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step() -> None:
        _loss(model.train()(x)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_ms = _timed_ms(step, args.steps, statistics.median)
    floors = floor(layers, args.repeats)
    print(f"{args.model}: {len(layers)} replaced layers, {torch.get_num_threads()} thread(s)")
    print("| measured | freeze step ms | synthesis x2 ms | estimator product ms | floor ms | floor / freeze step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in (("warm", "each operation alone, warm"), ("step", "in step order, each layer's tensors")):
        synth, product = floors[name]
        total = synth + product
        print(f"| {label} | {step_ms:.1f} | {synth:.1f} | {product:.1f} | {total:.1f} | {total / step_ms:.2%} |")
    for name, what in (("warm", "the arithmetic alone, warm caches"), ("step", "in step order")):
        print(f"least replace / freeze at the default ({what}): {1 + sum(floors[name]) / step_ms:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
