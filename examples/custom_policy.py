"""Choose the replaced blocks yourself: a Policy subclass, a whole-model policy, and a plain callable.

A policy is offered each stack of the model in turn and returns indices into it; ``select_all`` sees every
stack at once. A plain ``fn(module, path) -> bool`` works wherever a policy does, and policies combine with
``&`` and ``|``. Whatever a policy picks is validated: the first and last block of a stack and two adjacent
blocks are refused with a PolicyError that names them. Only ``plan`` runs here (nothing is trained), except
for the final ``convert``.

    python examples/custom_policy.py
    python examples/custom_policy.py --model vit_small_patch16_224 --budget 0.8
"""

from __future__ import annotations

import argparse

import timm
import torch

import replace_wrap
from replace_wrap import Every, Policy


# --8<-- [start:subclass]
class MiddleBlocks(Policy):
    """Every second block, but only in the middle of each stack: the ends keep ``margin`` real blocks."""

    def __init__(self, margin: int = 2):
        self.margin = margin

    def select(self, stack):
        return range(self.margin + 1, len(stack) - self.margin - 1, 2)

    def __repr__(self):
        return f"MiddleBlocks(margin={self.margin})"


# --8<-- [end:subclass]


# --8<-- [start:budget]
class TrainableBudget(Policy):
    """Replace blocks (every second one, from the middle outwards) until at most ``fraction`` of the
    model's parameters remain trainable. Needs the whole model, so it overrides ``select_all``."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def select_all(self, stacks, model):
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        left = total
        chosen = [set() for _ in stacks]
        candidates = [  # (distance from the stack's middle, stack number, index)
            (abs(i - (len(s) - 1) / 2), k, i) for k, s in enumerate(stacks) for i in range(1, len(s) - 1)
        ]
        for _, k, i in sorted(candidates):
            if left <= self.fraction * total:
                break
            if chosen[k] & {i - 1, i + 1}:
                continue  # never two adjacent replaced blocks
            chosen[k].add(i)
            left -= sum(p.numel() for p in stacks[k].modules[i].parameters() if p.requires_grad)
        return chosen

    def __repr__(self):
        return f"TrainableBudget({self.fraction})"


# --8<-- [end:budget]


# --8<-- [start:callable]
def late_blocks(module: torch.nn.Module, path: str) -> bool:
    """A plain filter: only blocks from index 4 on (early blocks learn generic features; keep them real).

    A timm ViT's block paths look like ``blocks.3``; see ``replace_wrap.plan(model)`` for your model's.
    """
    return int(path.rsplit(".", 1)[-1]) >= 4


# --8<-- [end:callable]


def replaced(report: replace_wrap.ConversionReport) -> str:
    return ", ".join(b.path for b in report.replaced) or "none"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="vit_small_patch16_224", help="a timm model name (built without weights)"
    )
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.75, help="TrainableBudget: fraction left trainable")
    args = p.parse_args(argv)
    model = timm.create_model(
        args.model, pretrained=False, num_classes=10, img_size=args.img_size, patch_size=8
    )

    # --8<-- [start:plans]
    policies = {
        "every=2 (the default)": Every(2),
        "Every(3, offset=1)": Every(3, offset=1),
        "MiddleBlocks(margin=2)": MiddleBlocks(margin=2),
        f"TrainableBudget({args.budget})": TrainableBudget(args.budget),
        "Every(2) & late_blocks": Every(2) & late_blocks,  # a callable combines with policies
        "MiddleBlocks() | Indices([1])": MiddleBlocks() | replace_wrap.Indices([1]),
    }
    for name, policy in policies.items():
        report = replace_wrap.plan(model, policy=policy)  # a dry run: the model is not changed
        print(f"{name:32s} -> {replaced(report)}  ({100 * report.trainable_ratio:.1f}% trainable)")
    # --8<-- [end:plans]

    # --8<-- [start:refused]
    def first_two(module, path):  # selects blocks 0 and 1: the first block, and adjacent ones
        return path in ("blocks.0", "blocks.1")

    try:
        replace_wrap.plan(model, policy=first_two)
    except replace_wrap.PolicyError as err:
        print(f"refused: {err}")
    # --8<-- [end:refused]

    replace_wrap.convert(model, policy=TrainableBudget(args.budget))
    print(replace_wrap.report(model))
    logits = model(torch.randn(2, 3, args.img_size, args.img_size))
    print(f"forward after convert: logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
