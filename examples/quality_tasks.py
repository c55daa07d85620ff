"""Training-quality tasks that every machine can run offline: the same data, model, budget and data order for
every variant, so variants (end-to-end, freeze, the replace_wrap defaults, the exact gradient, ...) compare.

Three tasks, each built from a config (nothing is downloaded):

- ``digits_vit``: a timm ViT (depth 8, width 96, patch 2) on scikit-learn's 8x8 digits (1437 train / 360 test);
  metric: test accuracy.
- ``digits_cnn``: a timm ResNet with BasicBlocks in four stages (widths 16-128, its 64-channel stem made a 3x3
  stride-1 convolution without max pooling, as for small images) on the same digits; ``every=2`` replaces blocks across stage boundaries (shape
  adaptation); metric: test accuracy.
- ``char_lm``: a byte-level GPT-2 (Hugging Face ``GPT2LMHeadModel`` from a config: 6 layers, width 128, context
  128; its projections are ``Conv1D`` layers) on the Python standard library's own sources, a fixed list of
  files present in Python 3.10-3.13, with whole files held out for the test; metric: test bits per byte.

A *variant* is a function ``variant(model, task) -> model`` or ``-> (model, param_groups)``: it converts,
freezes or leaves the freshly built model, and may return the optimizer's parameter groups (else
``replace_wrap.param_groups(model, weight_decay=...)``). Register more with :func:`register_variant`.

    from quality_tasks import run, compare, format_table
    result = run("digits_vit", "default", seed=0)        # one run: a dict of metric, params, seconds
    rows = compare(["digits_cnn"], ["default", "exact"], seeds=3)
    print(format_table(rows))
"""

from __future__ import annotations

import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import replace_wrap

__all__ = ["TASKS", "VARIANTS", "Task", "compare", "format_table", "register_variant", "run"]


# --- data -------------------------------------------------------------------------------------------------

_CACHE: dict[str, Any] = {}


def digits() -> tuple[torch.Tensor, ...]:
    """The 8x8 digits as (3, 8, 8) images scaled to [-1, 1], split 80/20 with a fixed permutation."""
    if "digits" not in _CACHE:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32) / 8.0 - 1.0  # pixel values are 0..16
        x = x[:, None].expand(-1, 3, -1, -1).contiguous()
        y = torch.tensor(data.target)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(y))
        _CACHE["digits"] = (x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]])
    return _CACHE["digits"]


# Files at the same path in CPython 3.10 to 3.13 (no module that became a package meanwhile). Whole files are
# held out for the test, so the model is scored on code it has never seen.
STDLIB_TRAIN = (
    "abc.py", "base64.py", "bisect.py", "calendar.py", "configparser.py", "contextlib.py", "copy.py", "csv.py",
    "fnmatch.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "heapq.py", "json/decoder.py",
    "json/encoder.py", "pprint.py", "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py", "string.py",
    "tempfile.py", "textwrap.py", "tokenize.py", "types.py", "uuid.py", "weakref.py",
)
STDLIB_TEST = ("difflib.py", "html/parser.py")


def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test byte streams (``uint8`` as ``long``) from this interpreter's standard library sources."""
    if "stdlib" not in _CACHE:
        root = Path(sysconfig.get_paths()["stdlib"])

        def read(names: tuple[str, ...]) -> torch.Tensor:
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise FileNotFoundError(f"standard library sources {missing} not found under {root}")
            data = b"\n".join((root / n).read_bytes() for n in names)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

        _CACHE["stdlib"] = (read(STDLIB_TRAIN), read(STDLIB_TEST))
    return _CACHE["stdlib"]


# --- models -----------------------------------------------------------------------------------------------


def build_digits_vit(depth: int = 8, width: int = 96) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=2, embed_dim=width, depth=depth, num_heads=4, num_classes=10)


def build_digits_cnn(channels: tuple[int, ...] = (16, 32, 64, 128)) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, layers=(2, 2, 2, 2), channels=channels, num_classes=10)
    # small images: a 3x3 stride-1 stem without max pooling (8x8 -> stages at 8, 4, 2, 1)
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_char_lm(layers: int = 6, width: int = 128, context: int = 128) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_positions=context, n_embd=width, n_layer=layers, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


# --- tasks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A model, its data and its training budget. ``steps``/``quick_steps``: optimizer steps of a full and of a
    ``quick`` run; the learning rate follows a one-cycle schedule over them."""

    name: str
    build: Callable[[], nn.Module]
    kind: str  # "classify" (digits) or "lm" (bytes)
    steps: int
    quick_steps: int
    batch: int
    lr: float
    weight_decay: float = 0.05
    context: int = 128
    metric: str = "test accuracy"
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


TASKS: dict[str, Task] = {
    # 30 epochs of the 1437 training digits in batches of 64
    "digits_vit": Task("digits_vit", build_digits_vit, "classify", steps=690, quick_steps=15, batch=64, lr=1e-3),
    "digits_cnn": Task("digits_cnn", build_digits_cnn, "classify", steps=460, quick_steps=25, batch=64, lr=3e-3),
    "char_lm": Task("char_lm", build_char_lm, "lm", steps=600, quick_steps=20, batch=16, lr=2e-3,
                    metric="test bits per byte", higher_is_better=False),
}


# --- variants -----------------------------------------------------------------------------------------------

Variant = Callable[[nn.Module, Task], Any]
VARIANTS: dict[str, Variant] = {}


def register_variant(name: str) -> Callable[[Variant], Variant]:
    """Register ``fn(model, task) -> model | (model, param_groups)`` as a variant named ``name``."""

    def decorator(fn: Variant) -> Variant:
        VARIANTS[name] = fn
        return fn

    return decorator


@register_variant("end-to-end")
def _end_to_end(model: nn.Module, task: Task) -> nn.Module:
    return model


@register_variant("freeze")
def _freeze(model: nn.Module, task: Task) -> nn.Module:
    """The blocks ``every=2`` would replace keep their tensors, frozen."""
    for block in replace_wrap.plan(model, every=2).replaced:
        for rel in block.synthesized:
            model.get_parameter(f"{block.path}.{rel}").requires_grad_(False)
    return model


@register_variant("default")
def _default(model: nn.Module, task: Task) -> nn.Module:
    """``replace_wrap.convert(model, every=2)`` with no options: the sampled scalar gradient where it pays."""
    return replace_wrap.convert(model, every=2)


@register_variant("exact")
def _exact(model: nn.Module, task: Task) -> nn.Module:
    """The exact scalar gradient, one option away."""
    return replace_wrap.convert(model, every=2, ab_grad_sample="exact")


# --- the training loop --------------------------------------------------------------------------------------


def _batches(task: Task, seed: int, steps: int) -> Any:
    """The data order: a function of the seed only, the same for every variant."""
    g = torch.Generator().manual_seed(seed)
    if task.kind == "classify":
        xtr, ytr = digits()[:2]
        order = torch.cat([torch.randperm(len(ytr), generator=g) for _ in range(steps * task.batch // len(ytr) + 2)])
        for i in range(steps):
            idx = order[i * task.batch:(i + 1) * task.batch]
            yield xtr[idx], ytr[idx]
    else:
        train = stdlib_bytes()[0]
        for _ in range(steps):
            start = torch.randint(0, len(train) - task.context - 1, (task.batch,), generator=g)
            window = torch.stack([train[s:s + task.context + 1] for s in start.tolist()])
            yield window[:, :-1], window[:, 1:]


def _loss(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task.kind == "classify":
        return F.cross_entropy(model(x), y)
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, quick: bool = False) -> float:
    """Test accuracy (digits) or test bits per byte over contiguous windows of the held-out files."""
    model.eval()
    if task.kind == "classify":
        xte, yte = digits()[2:]
        return (model(xte).argmax(-1) == yte).float().mean().item()
    test = stdlib_bytes()[1]
    n = (len(test) - 1) // task.context
    n = min(n, 16) if quick else n
    x = test[: n * task.context].reshape(n, task.context)
    y = test[1: n * task.context + 1].reshape(n, task.context)
    total = sum(_loss(model, task, x[i:i + 32], y[i:i + 32]).item() * len(x[i:i + 32]) for i in range(0, n, 32))
    return total / n / torch.log(torch.tensor(2.0)).item()


def run(task: str | Task, variant: str | Variant, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Build, prepare with ``variant``, train and evaluate one model; returns metric, parameters and seconds.

    The model's initial weights, the data order and the estimator's samples are functions of ``seed`` (every
    variant of one seed starts from the same weights and sees the same batches). A converted model is scored
    after ``replace_wrap.merge``: what would be deployed.
    """
    task = TASKS[task] if isinstance(task, str) else task
    name = variant if isinstance(variant, str) else getattr(variant, "__name__", "custom")
    prepare = VARIANTS[variant] if isinstance(variant, str) else variant
    torch.manual_seed(seed)
    model = task.build()
    out = prepare(model, task)
    model, groups = out if isinstance(out, tuple) else (out, None)
    if groups is None:
        groups = replace_wrap.param_groups(model, weight_decay=task.weight_decay)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = task.quick_steps if quick else task.steps
    opt = torch.optim.AdamW(groups, lr=task.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=task.lr, total_steps=steps, pct_start=0.1)
    torch.manual_seed(seed)  # the models are dropout-free: this seeds the estimator's samples only
    model.train()
    t0 = time.perf_counter()
    losses = []
    for x, y in _batches(task, seed, steps):
        loss = _loss(model, task, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    if any(isinstance(m, replace_wrap.ReplacementSite) for m in model.modules()):
        replace_wrap.merge(model)
    return {
        "task": task.name, "variant": name, "seed": seed, "metric": task.metric, "value": evaluate(model, task, quick),
        "trainable": trainable, "train_s": train_s, "steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
        "python": sys.version.split()[0],
    }


def compare(tasks: list[str], variants: list[str], seeds: int = 3, quick: bool = False,
            log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every task x seed x variant, variants interleaved within a seed (load drift hits all alike)."""
    rows = []
    for task in tasks:
        for seed in range(seeds):
            for variant in variants:
                rows.append(run(task, variant, seed, quick))
                if log:
                    r = rows[-1]
                    log(f"{task} seed {seed} {variant}: {r['metric']} {r['value']:.4f} ({r['train_s']:.1f} s)")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Mean +- standard deviation over seeds per task and variant, as a Markdown table."""
    lines = ["| task | variant | metric | mean | std | per seed | trainable | train s / run |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    keys = list(dict.fromkeys((r["task"], r["variant"]) for r in rows))
    for task, variant in keys:
        mine = [r for r in rows if (r["task"], r["variant"]) == (task, variant)]
        values = [r["value"] for r in mine]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {task} | {variant} | {mine[0]['metric']} | {statistics.mean(values):.4f} | {sd:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in values)} | {mine[0]['trainable']:,} | "
            f"{statistics.mean(r['train_s'] for r in mine):.1f} |"
        )
    return "\n".join(lines)
