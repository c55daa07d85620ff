"""Experiment: learn *where* to replace (Scalable-Weight-Reparametrization style) vs Every(2), same budget.

Search phase: a fresh ViT trains for a few epochs in which every candidate block i (not first or last)
computes with ``(1 - g_i) * W_i + g_i * (a_i * W_{i-1} + b_i * W_{i+1})`` for all its tensors, with a gate
``g_i = sigmoid(theta_i)`` and a penalty ``lam * (sum_i g_i - K)^2`` that holds the gates to the budget of K
replaced blocks (K = what ``Every(2)`` replaces). The gates are then frozen into a selection: the K
non-adjacent blocks with the highest gates (an exact DP). Training phase: the *same initial weights* are
converted with that selection, and trained exactly like the ``Every(2)`` conversion they are compared with.

    bash .ci/venv python examples/learned_selection.py              # the numbers in docs/policies.md
    bash .ci/venv python examples/learned_selection.py --small      # a seconds-long smoke run (the tests)

The result is recorded in docs/policies.md; the library ships no learned policy because it showed no gain.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn
from torch.func import functional_call

import replace_wrap
from replace_wrap.selection._solvers import min_cost_cover

try:  # run as a script (examples/ on sys.path) or imported by the tests (examples. package path)
    from similarity_vs_every import evaluate, load_digits_split, make_vit, train
except ImportError:  # pragma: no cover
    from examples.similarity_vs_every import evaluate, load_digits_split, make_vit, train


def search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, epochs: int, seed: int,
           lam: float = 1.0, lr: float = 2e-3, gate_lr: float = 5e-2, batch: int = 64) -> list[float]:
    """Train ``model`` with gated blocks; return each candidate block's final gate (index 1..depth-2)."""
    blocks = model.blocks
    n = len(blocks)
    cand = list(range(1, n - 1))
    theta = nn.Parameter(torch.full((len(cand),), float(torch.logit(torch.tensor(k / len(cand))))))
    ab = nn.Parameter(torch.full((len(cand), 2), 0.5))
    names = [name for name, _ in blocks[0].named_parameters()]
    # the gates get their own, larger step: at the weights' rate they hardly leave their start in a few epochs
    opt = torch.optim.AdamW(
        [{"params": list(model.parameters())}, {"params": [theta, ab], "lr": gate_lr, "weight_decay": 0.0}],
        lr=lr, weight_decay=0.05,
    )
    g_rng = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g_rng)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            gates = torch.sigmoid(theta)
            params = dict(model.named_parameters())
            for j, b in enumerate(cand):
                for name in names:
                    own, prev, nxt = (params[f"blocks.{c}.{name}"] for c in (b, b - 1, b + 1))
                    mix = ab[j, 0] * prev.detach() + ab[j, 1] * nxt.detach()
                    params[f"blocks.{b}.{name}"] = (1 - gates[j]) * own + gates[j] * mix
            loss = nn.functional.cross_entropy(functional_call(model, params, (x[idx],)), y[idx])
            loss = loss + lam * (gates.sum() - k) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.sigmoid(theta).tolist()


def select(gates: list[float], k: int) -> list[int]:
    """The k non-adjacent candidates (block indices 1..) with the highest gates, exactly."""
    picked = min_cost_cover([1] * len(gates), [1.0 - g for g in gates], [j > 0 for j in range(len(gates))], k)
    return [j + 1 for j in picked or []]


def run(seed: int = 0, depth: int = 8, width: int = 48, search_epochs: int = 5, epochs: int = 25,
        limit: int | None = None) -> dict:
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_split(seed, limit)
    t0 = time.perf_counter()
    init = make_vit(depth, width, seed)
    k = len(replace_wrap.Every(2).indices(depth))
    gates = search(copy.deepcopy(init), xtr, ytr, k, search_epochs, seed)
    learned = select(gates, k)
    out = {"config": {"seed": seed, "depth": depth, "width": width, "search_epochs": search_epochs,
                      "epochs": epochs, "budget_blocks": k},
           "gates": [round(g, 3) for g in gates], "selection": learned}
    for name, policy in (("Every(2)", replace_wrap.Every(2)), ("learned", replace_wrap.Indices(learned))):
        model = replace_wrap.convert(copy.deepcopy(init), policy=policy)
        train(model, xtr, ytr, epochs, lr=2e-3, seed=seed)
        out[name] = evaluate(model, xte, yte) | {
            "replaced": [b.index for b in replace_wrap.report(model).replaced],
            "trainable": replace_wrap.report(model).trainable_after,
        }
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--small", action="store_true", help="a few seconds: 200 images, 1+1 epochs")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    results = []
    for seed in args.seeds:
        r = run(seed, depth=5, width=32, search_epochs=1, epochs=1, limit=200) if args.small else run(seed)
        results.append(r)
        print(
            f"seed {seed}: gates {r['gates']} -> {r['selection']} | Every(2) {r['Every(2)']['replaced']}: "
            f"acc {100 * r['Every(2)']['acc']:.2f}% loss {r['Every(2)']['loss']:.4f} | learned: "
            f"acc {100 * r['learned']['acc']:.2f}% loss {r['learned']['loss']:.4f} ({r['seconds']:.0f} s)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
