"""The transfer setting: pretrain on one split, fine-tune on another under a budget of updated parameters.

For each task of ``quality_tasks.py`` a model is pretrained end-to-end on one split (digits 0-4; the first half
of the standard-library training files) and fine-tuned on the other (digits 5-9, scored on the test images of
5-9; the second half of the files, scored on the held-out files). Every fine-tuning variant of a seed starts
from the same pretrained weights and sees the same batches with the same optimizer and schedule:

- ``full``: full fine-tuning.
- ``freeze``: the blocks ``Every(2)`` would replace stay frozen at their pretrained values.
- ``Every(2)``: ``convert(model, every=2)`` (scalars from ``(0.5, 0.5)``).
- ``Every(2) lsq init``: the same blocks, scalars from the least-squares fit of each pretrained block to its
  neighbours (the block's pretrained function, as near as a mix of its neighbours gets).
- ``Budget(redundancy)``: ``Budget(trainable=f, prefer="redundancy")``, ``f`` the fraction ``Every(2)`` leaves.
- ``Similarity``: ``Similarity(trainable=f)``: the same choice, scalars from the least-squares fit.
- ``LoRA (same budget)``: PEFT LoRA on every linear / convolution layer of the blocks (base frozen, the
  classification head trained), its rank set so that it updates as many parameters as ``Every(2)``.
- ``LoRA r=8``: the rank users often pick (fewer updated parameters: not the same budget; for reference).
- ``learned``: an SWR-style learned selection (:func:`learned_selection`): gates under a budget penalty during
  a short search phase on the fine-tuning data, then the chosen blocks are converted from the pretrained
  weights with the searched scalars and fine-tuned like the others (its time includes the search).

    from quality_transfer import run_transfer
    row = run_transfer("digits_vit", "Similarity", seed=0)   # metric, updated parameters, memory, time
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality_tasks.py, next to this file

import quality_tasks as qt  # noqa: E402

import replace_wrap  # noqa: E402
from replace_wrap.analysis.discovery import analyse  # noqa: E402
from replace_wrap.config import ReplaceConfig  # noqa: E402
from replace_wrap.selection.budget import solve_budget  # noqa: E402
from replace_wrap.surgery.plan import candidates, trainable_count  # noqa: E402

__all__ = ["SPLITS", "TRANSFER_VARIANTS", "learned_selection", "lora_targets", "pretrained", "run_transfer",
           "split_tasks"]

_HALF = len(qt.STDLIB_TRAIN) // 2
# base task -> (pretraining split, fine-tuning split, classification head left trainable under LoRA)
SPLITS: dict[str, dict[str, Any]] = {
    "digits_vit": {"pre": {"classes": (0, 1, 2, 3, 4), "steps": 345}, "ft": {"classes": (5, 6, 7, 8, 9), "steps": 172},
                   "head": "head"},
    "digits_cnn": {"pre": {"classes": (0, 1, 2, 3, 4), "steps": 230}, "ft": {"classes": (5, 6, 7, 8, 9), "steps": 115},
                   "head": "fc"},
    "char_lm": {"pre": {"train_files": qt.STDLIB_TRAIN[:_HALF], "steps": 600},
                "ft": {"train_files": qt.STDLIB_TRAIN[_HALF:], "steps": 200}, "head": None},
}


def split_tasks(base: str) -> tuple[qt.Task, qt.Task]:
    """The pretraining and the fine-tuning task of ``base``."""
    task, spec = qt.get_task(base), SPLITS[base]

    def derive(part: str) -> qt.Task:
        opts = dict(spec[part])
        steps = opts.pop("steps")
        return dataclasses.replace(task, name=f"{base}/{part}", steps=steps,
                                   quick_steps=max(10, task.quick_steps // 2), **opts)

    return derive("pre"), derive("ft")


def pretrained(base: str, seed: int, quick: bool = False, cache: Path | None = None) -> dict[str, torch.Tensor]:
    """End-to-end pretraining on the first split; the state dict, cached in ``cache`` when given."""
    path = cache / f"{base}-seed{seed}{'-quick' if quick else ''}.pt" if cache else None
    if path is not None and path.is_file():
        return torch.load(path)
    result, model = qt.run(split_tasks(base)[0], "end-to-end", seed, quick, return_model=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return state


# --- LoRA ----------------------------------------------------------------------------------------------------


def lora_targets(model: nn.Module) -> tuple[list[str], int]:
    """Every linear, HF ``Conv1D`` and 2-d convolution inside the model's blocks, and LoRA parameters per unit
    of rank over them (``in + out`` for a matrix; ``in * kh * kw + out`` for a convolution)."""
    blocks = [p for s in analyse(model).stacks for p in s.paths]
    names, per_rank = [], 0
    for name, m in model.named_modules():
        if not any(name.startswith(b + ".") for b in blocks):
            continue
        if isinstance(m, nn.Linear):
            per_rank += m.in_features + m.out_features
        elif type(m).__name__ == "Conv1D":  # Hugging Face's (GPT-2): weight (in, out)
            per_rank += sum(m.weight.shape)
        elif isinstance(m, nn.Conv2d) and m.groups == 1:
            per_rank += m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
        else:
            continue
        names.append(name)
    return names, per_rank


def lora(rank: int | None, head: str | None) -> Callable[[nn.Module, qt.Task], nn.Module]:
    """A LoRA variant (``lora_alpha = rank``: scale 1); ``rank=None`` matches ``Every(2)``'s updated parameters."""

    def variant(model: nn.Module, task: qt.Task) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        names, per_rank = lora_targets(model)
        head_params = sum(p.numel() for p in model.get_submodule(head).parameters()) if head else 0
        r = rank or max(1, round((replace_wrap.plan(model, every=2).trainable_after - head_params) / per_rank))
        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=names,
                            modules_to_save=[head] if head else None,
                            fan_in_fan_out=any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names))
        return get_peft_model(model, config)

    return variant


# --- SWR-style learned selection ------------------------------------------------------------------------------


class _Chosen(replace_wrap.Paths):
    """The searched blocks, each starting from its searched scalars."""

    def __init__(self, scalars: dict[str, tuple[float, float]]):
        super().__init__(list(scalars))
        self.scalars = scalars

    def initial_scalars(self, stack: Any, index: int, match: Any, n_sets: int) -> Any:
        a, b = self.scalars[stack.paths[index]]
        return torch.full((n_sets,), a), torch.full((n_sets,), b)


def learned_selection(model: nn.Module, task: qt.Task, fraction: float, steps: int, seed: int,
                      penalty: float = 1.0, gate_lr: float = 5e-2) -> tuple[_Chosen, dict[str, Any]]:
    """Search where to replace: train a copy of ``model`` for ``steps`` steps of ``task`` with every replaceable
    block computing ``(1 - g) * W + g * (a * W_prev + b * W_next)`` (``g = sigmoid(theta)``, neighbours detached,
    ``(a, b)`` from the least-squares fit) under the penalty ``penalty * ((sum g * saving - need) / need)^2``
    (``need``: the parameters to save for ``fraction``); then the cheapest selection that meets the budget with
    costs ``1 - g`` (``Budget``'s exact solver). Returns the policy (the chosen blocks and their searched
    scalars) and what the search saw."""
    model = copy.deepcopy(model)
    cfg = ReplaceConfig()
    stacks = analyse(model).stacks
    cands = [c for c in candidates(stacks, model, cfg) if c.net > 0]
    before = trainable_count(model)
    need = before - math.floor(fraction * before)
    start = min(max(need / sum(c.net for c in cands), 0.05), 0.95)
    theta = nn.Parameter(torch.full((len(cands),), math.log(start / (1 - start))))
    fits = [replace_wrap.Similarity().initial_scalars(stacks[c.stack], c.index, c.match, 1) for c in cands]
    ab = nn.Parameter(torch.tensor([[float(a[0]), float(b[0])] for a, b in fits]))
    net = torch.tensor([float(c.net) for c in cands])
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad]},
                             {"params": [theta, ab], "lr": gate_lr, "weight_decay": 0.0}],
                            lr=task.lr, weight_decay=task.weight_decay)
    model.train()
    for x, y in qt.batches(task, seed, steps):
        g = torch.sigmoid(theta)
        subs = {}
        for j, c in enumerate(cands):
            for tm in c.match.synthesized:
                name = f"{c.path}.{tm.rel}"
                prev, nxt = tm.sources()
                mix = ab[j, 0] * prev.detach() + ab[j, 1] * nxt.detach()
                subs[name] = (1 - g[j]) * model.get_parameter(name) + g[j] * mix
        loss = qt.task_loss(lambda *a, **k: functional_call(model, subs, a, k, strict=False), task, x, y)
        loss = loss + penalty * (((g * net).sum() - need) / need) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    gates = torch.sigmoid(theta).detach()
    chosen = solve_budget(fraction, cands, [1.0 - float(v) + 1e-9 for v in gates], before, model, "learned selection")
    index = {c.path: j for j, c in enumerate(cands)}
    ab = ab.detach()
    scalars = {c.path: (float(ab[index[c.path], 0]), float(ab[index[c.path], 1])) for c in chosen}
    info = {"gates": {c.path: round(float(v), 3) for c, v in zip(cands, gates)}, "selection": sorted(scalars)}
    return _Chosen(scalars), info


# --- the variants and one run ------------------------------------------------------------------------------


def _every2(model: nn.Module, task: qt.Task) -> nn.Module:
    return replace_wrap.convert(model, every=2)


def _every2_fitted(model: nn.Module, task: qt.Task) -> nn.Module:
    return qt.VARIANTS["lsq init"](model, task)


def _budget(model: nn.Module, task: qt.Task) -> nn.Module:
    f = qt.every2_fraction(model)
    return replace_wrap.convert(model, policy=replace_wrap.Budget(trainable=f, prefer="redundancy"))


def _similarity(model: nn.Module, task: qt.Task) -> nn.Module:
    return replace_wrap.convert(model, policy=replace_wrap.Similarity(trainable=qt.every2_fraction(model)))


TRANSFER_VARIANTS = ("full", "freeze", "Every(2)", "Every(2) lsq init", "Budget(redundancy)", "Similarity",
                     "LoRA (same budget)", "LoRA r=8", "learned")


def run_transfer(base: str, variant: str, seed: int = 0, quick: bool = False, cache: Path | None = None,
                 search_fraction: float = 0.25) -> dict[str, Any]:
    """Fine-tune ``base``'s pretrained model (seed ``seed``) with ``variant``; one result row.

    ``search_fraction``: the learned selection's search phase, as a fraction of the fine-tuning steps.
    """
    pre, ft = split_tasks(base)
    state = pretrained(base, seed, quick, cache)
    head = SPLITS[base]["head"]
    info: dict[str, Any] = {}
    search_s = 0.0
    if variant == "learned":
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = ft.build()
        model.load_state_dict(state)
        steps = max(1, round((ft.quick_steps if quick else ft.steps) * search_fraction))
        policy, info = learned_selection(model, ft, qt.every2_fraction(model), steps, seed)
        search_s = time.perf_counter() - t0
        prepare: Callable[..., Any] = lambda m, t: replace_wrap.convert(m, policy=policy)  # noqa: E731
    else:
        prepare = {
            "full": qt.VARIANTS["end-to-end"], "freeze": qt.VARIANTS["freeze"], "Every(2)": _every2,
            "Every(2) lsq init": _every2_fitted,
            "Budget(redundancy)": _budget, "Similarity": _similarity, "LoRA (same budget)": lora(None, head),
            "LoRA r=8": lora(8, head),
        }[variant]
    seen: dict[str, Any] = {}

    def recording(model: nn.Module, task: qt.Task) -> Any:
        if variant == "freeze":
            seen["blocks"] = qt.every2_paths(model)
        out = prepare(model, task)
        model = out[0] if isinstance(out, tuple) else out
        if any(isinstance(m, replace_wrap.ReplacementSite) for m in model.modules()):
            seen["blocks"] = [b.path for b in replace_wrap.report(model).replaced]
        return out

    result, model = qt.run(ft, recording, seed, quick, init=state, name=variant, return_model=True)
    result.update(info, search_s=search_s, time_s=result["train_s"] + search_s, base=base,
                  blocks=seen.get("blocks", []), lora_rank=_lora_rank(model))
    return result


def _lora_rank(model: nn.Module) -> int | None:
    cfg = getattr(model, "peft_config", None)
    return cfg["default"].r if cfg else None
