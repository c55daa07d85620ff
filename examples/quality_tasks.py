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

``examples/quality_study.py`` runs the study of ``docs/quality.md`` on these tasks: the variants below (freeze, drop,
``Budget``/``Similarity`` at the same trainable fraction, the ablations of the method's open choices), the
training-length curve (``run(..., scale=...)``) and the transfer setting (``examples/quality_transfer.py``, which
passes pretrained weights with ``run(..., init=...)``).
"""

from __future__ import annotations

import contextlib
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

__all__ = ["MORE_TASKS", "TASKS", "VARIANTS", "Task", "batches", "compare", "evaluate", "format_table", "get_task",
           "register_variant", "run", "task_loss", "training_memory"]


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


def digits_subset(classes: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    """:func:`digits`, restricted to the images of ``classes`` (all of them for ``None``)."""
    xtr, ytr, xte, yte = digits()
    if classes is None:
        return xtr, ytr, xte, yte
    keep_tr, keep_te = torch.isin(ytr, torch.tensor(classes)), torch.isin(yte, torch.tensor(classes))
    return xtr[keep_tr], ytr[keep_tr], xte[keep_te], yte[keep_te]


# Files at the same path in CPython 3.10 to 3.13 (no module that became a package meanwhile). Whole files are
# held out for the test, so the model is scored on code it has never seen.
STDLIB_TRAIN = (
    "abc.py", "base64.py", "bisect.py", "calendar.py", "configparser.py", "contextlib.py", "copy.py", "csv.py",
    "fnmatch.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "heapq.py", "json/decoder.py",
    "json/encoder.py", "pprint.py", "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py", "string.py",
    "tempfile.py", "textwrap.py", "tokenize.py", "types.py", "uuid.py", "weakref.py",
)
STDLIB_TEST = ("difflib.py", "html/parser.py")


def stdlib_bytes(train_files: tuple[str, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test byte streams (``uint8`` as ``long``) from this interpreter's standard library sources.

    ``train_files``: the files of the training stream (default :data:`STDLIB_TRAIN`); the test stream is always
    :data:`STDLIB_TEST`.
    """
    train_files = STDLIB_TRAIN if train_files is None else tuple(train_files)
    key = ("stdlib", train_files)
    if key not in _CACHE:
        root = Path(sysconfig.get_paths()["stdlib"])

        def read(names: tuple[str, ...]) -> torch.Tensor:
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise FileNotFoundError(f"standard library sources {missing} not found under {root}")
            data = b"\n".join((root / n).read_bytes() for n in names)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

        _CACHE[key] = (read(train_files), read(STDLIB_TEST))
    return _CACHE[key]


# --- models -----------------------------------------------------------------------------------------------


def build_digits_vit(depth: int = 8, width: int = 96) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=2, embed_dim=width, depth=depth, num_heads=4, num_classes=10)


def build_digits_cnn(channels: tuple[int, ...] = (16, 32, 64, 128), layers: tuple[int, ...] = (2, 2, 2, 2)) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, layers=layers, channels=channels, num_classes=10)
    # small images: a 3x3 stride-1 stem without max pooling (8x8 -> stages at 8, 4, 2, 1)
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_digits_mlp(depth: int = 8, width: int = 128) -> nn.Module:
    """A plain MLP: ``depth`` blocks of ``Linear + ReLU``, no residual connection and no normalization layer."""
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, width), nn.ReLU(), blocks, nn.Linear(width, 10))


def build_char_lm(layers: int = 6, width: int = 128, context: int = 128) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_positions=context, n_embd=width, n_layer=layers, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


# --- tasks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A model, its data and its training budget. ``steps``/``quick_steps``: optimizer steps of a full and of a
    ``quick`` run; the learning rate follows a one-cycle schedule over them. ``classes`` (digits) restricts the
    training and test images to those labels, ``train_files`` (text) the training stream to those files: the
    transfer study's splits (``dataclasses.replace`` a task to make one)."""

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
    classes: tuple[int, ...] | None = None
    train_files: tuple[str, ...] | None = None


TASKS: dict[str, Task] = {
    # 30 epochs of the 1437 training digits in batches of 64
    "digits_vit": Task("digits_vit", build_digits_vit, "classify", steps=690, quick_steps=15, batch=64, lr=1e-3),
    "digits_cnn": Task("digits_cnn", build_digits_cnn, "classify", steps=460, quick_steps=25, batch=64, lr=3e-3),
    "char_lm": Task("char_lm", build_char_lm, "lm", steps=600, quick_steps=20, batch=16, lr=2e-3,
                    metric="test bits per byte", higher_is_better=False),
}

# Tasks of the study that bench_accuracy.py does not run by default. ``digits_cnn_deep``: four BasicBlocks per
# stage, so that some blocks have neighbours of their own shape (adapt_shapes=False can replace them) and
# ``Every(2, offset=1)`` replaces the stage-boundary blocks (downsampling, another width) too.
# ``digits_mlp``: a plain MLP (no residual connection, no normalization): where a replaced block's scale
# reaches the output undamped, unlike in the residual, normalized blocks of the three main tasks.
MORE_TASKS: dict[str, Task] = {
    "digits_mlp": Task("digits_mlp", build_digits_mlp, "classify", steps=460, quick_steps=25, batch=64, lr=1e-3),
    "digits_cnn_deep": Task("digits_cnn_deep", lambda: build_digits_cnn(layers=(4, 4, 4, 4)), "classify", steps=460,
                            quick_steps=25, batch=64, lr=3e-3),
}


def get_task(name: str) -> Task:
    """A task of :data:`TASKS` or :data:`MORE_TASKS` by name."""
    if name in TASKS:
        return TASKS[name]
    if name in MORE_TASKS:
        return MORE_TASKS[name]
    raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS) + sorted(MORE_TASKS)}")


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


def every2_paths(model: nn.Module) -> list[str]:
    """The blocks ``convert(model, every=2)`` replaces: what ``freeze`` freezes and ``drop`` removes."""
    return [b.path for b in replace_wrap.plan(model, every=2).replaced]


def freeze_blocks(model: nn.Module, policy: Any = None) -> nn.Module:
    """Freeze the tensors that ``convert`` with ``policy`` (default ``every=2``) would synthesize."""
    rep = replace_wrap.plan(model, every=2) if policy is None else replace_wrap.plan(model, policy=policy)
    for block in rep.replaced:
        for rel in block.synthesized:
            model.get_parameter(f"{block.path}.{rel}").requires_grad_(False)
    return model


@register_variant("freeze")
def _freeze(model: nn.Module, task: Task) -> nn.Module:
    """The blocks ``every=2`` would replace keep their tensors, frozen."""
    return freeze_blocks(model)


@register_variant("drop")
def _drop(model: nn.Module, task: Task) -> nn.Module:
    """A shallower model: the blocks ``every=2`` would replace are removed from their stack (the others keep their
    initial weights). Only for blocks that keep the shape of their input (not a CNN's downsampling block)."""
    for path in sorted(every2_paths(model), key=lambda p: (p.rpartition(".")[0], -int(p.rpartition(".")[2]))):
        parent_path, _, index = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            raise TypeError(f"drop: {path} is not in an nn.Sequential or nn.ModuleList; cannot remove it")
        del parent[int(index)]
    return model


@register_variant("default")
def _default(model: nn.Module, task: Task) -> nn.Module:
    """``replace_wrap.convert(model, every=2)`` with no options: the sampled scalar gradient where it pays."""
    return replace_wrap.convert(model, every=2)


@register_variant("exact")
def _exact(model: nn.Module, task: Task) -> nn.Module:
    """The exact scalar gradient, one option away."""
    return replace_wrap.convert(model, every=2, ab_grad_sample="exact")


def every2_fraction(model: nn.Module, **options: Any) -> float:
    """The trainable fraction that ``convert(model, every=2, **options)`` leaves: the budget of the policies."""
    return replace_wrap.plan(model, every=2, **options).trainable_ratio


@register_variant("budget")
def _budget(model: nn.Module, task: Task) -> nn.Module:
    """``Budget(trainable=f)`` (fewest blocks, the largest first) at the fraction ``f`` that ``every=2`` leaves."""
    return replace_wrap.convert(model, policy=replace_wrap.Budget(trainable=every2_fraction(model)))


@register_variant("similarity")
def _similarity(model: nn.Module, task: Task) -> nn.Module:
    """``Similarity(trainable=f)`` at the fraction ``f`` that ``every=2`` leaves (fitted to fresh weights)."""
    return replace_wrap.convert(model, policy=replace_wrap.Similarity(trainable=every2_fraction(model)))


def convert_or_keep(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``convert``, or the model unchanged where the policy finds no replaceable block (the run then says so)."""
    try:
        return replace_wrap.convert(model, **kwargs)
    except replace_wrap.NothingToReplaceError:
        return model


@register_variant("adapt_shapes=False")
def _adapt_off(model: nn.Module, task: Task) -> nn.Module:
    """``every=2`` without shape adaptation: blocks with a neighbour of another shape stay real (on
    ``digits_cnn`` that is every block ``every=2`` picks, so this is end-to-end training)."""
    return convert_or_keep(model, every=2, adapt_shapes=False)


# --- the ablations: the method's open choices, each one option away from the default -------------------------


def _with_options(**options: Any) -> Variant:
    def variant(model: nn.Module, task: Task) -> nn.Module:
        return replace_wrap.convert(model, every=2, **options)

    return variant


for _name, _options in {
    "scalars=tensor": {"scalars": "tensor"},
    "coupled": {"neighbour_grad": "coupled"},
    "rule=convex": {"rule": "convex"},
    "rule=ema": {"rule": "ema"},
}.items():
    register_variant(_name)(_with_options(**_options))


@register_variant("scalar_lr x10")
def _scalar_lr(model: nn.Module, task: Task) -> tuple[nn.Module, list[dict[str, Any]]]:
    """``every=2``; the scalars in their own parameter group at 10x the task's learning rate."""
    replace_wrap.convert(model, every=2)
    return model, replace_wrap.param_groups(model, weight_decay=task.weight_decay, scalar_lr=10 * task.lr)


@register_variant("lsq init")
def _lsq_init(model: nn.Module, task: Task) -> nn.Module:
    """``every=2`` with ``init="fit"``: each block's scalars start at the least-squares fit of its own (fresh)
    tensors to its neighbours' (what :class:`replace_wrap.Similarity` starts from), not at ``(0.5, 0.5)``."""
    return replace_wrap.convert(model, every=2, init="fit")


# --- digits_cnn_deep: replacing stage-boundary blocks (adapted shapes) or keeping them -----------------------


@register_variant("offset1")
def _offset1(model: nn.Module, task: Task) -> nn.Module:
    """``Every(2, offset=1)``: on ``digits_cnn_deep`` blocks 2, 4, ... of the stack, the stage-boundary blocks
    (downsampling, synthesized from neighbours of another width) among them."""
    return replace_wrap.convert(model, policy=replace_wrap.Every(2, offset=1))


@register_variant("offset1, adapt_shapes=False")
def _offset1_keep(model: nn.Module, task: Task) -> nn.Module:
    """The same policy without shape adaptation: the stage-boundary blocks stay real."""
    return convert_or_keep(model, policy=replace_wrap.Every(2, offset=1), adapt_shapes=False)


@register_variant("budget at the adapt_shapes=False fraction")
def _budget_keep(model: nn.Module, task: Task) -> nn.Module:
    """``Budget`` (shape adaptation on) at the fraction that ``Every(2, offset=1), adapt_shapes=False`` leaves."""
    rep = replace_wrap.plan(model, policy=replace_wrap.Every(2, offset=1), adapt_shapes=False)
    return replace_wrap.convert(model, policy=replace_wrap.Budget(trainable=rep.trainable_ratio))


# --- the training loop --------------------------------------------------------------------------------------


def batches(task: Task, seed: int, steps: int) -> Any:
    """The data order: a function of the seed only, the same for every variant."""
    g = torch.Generator().manual_seed(seed)
    if task.kind == "classify":
        xtr, ytr = digits_subset(task.classes)[:2]
        order = torch.cat([torch.randperm(len(ytr), generator=g) for _ in range(steps * task.batch // len(ytr) + 2)])
        for i in range(steps):
            idx = order[i * task.batch:(i + 1) * task.batch]
            yield xtr[idx], ytr[idx]
    else:
        train = stdlib_bytes(task.train_files)[0]
        for _ in range(steps):
            start = torch.randint(0, len(train) - task.context - 1, (task.batch,), generator=g)
            window = torch.stack([train[s:s + task.context + 1] for s in start.tolist()])
            yield window[:, :-1], window[:, 1:]


def task_loss(model: Callable[..., Any], task: Task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss of ``model`` (a module, or any callable with its signature) on a batch."""
    if task.kind == "classify":
        return F.cross_entropy(model(x), y)
    logits = model(input_ids=x, use_cache=False).logits  # no key/value cache: training, and blocks may be dropped
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, quick: bool = False) -> float:
    """Test accuracy (digits) or test bits per byte over contiguous windows of the held-out files."""
    model.eval()
    if task.kind == "classify":
        xte, yte = digits_subset(task.classes)[2:]
        return (model(xte).argmax(-1) == yte).float().mean().item()
    test = stdlib_bytes(task.train_files)[1]
    n = (len(test) - 1) // task.context
    n = min(n, 16) if quick else n
    x = test[: n * task.context].reshape(n, task.context)
    y = test[1: n * task.context + 1].reshape(n, task.context)
    total = sum(task_loss(model, task, x[i:i + 32], y[i:i + 32]).item() * len(x[i:i + 32]) for i in range(0, n, 32))
    return total / n / torch.log(torch.tensor(2.0)).item()


class _SavedBytes:
    """Bytes of the tensors autograd saves for the backward, each storage once, parameters' storages excluded."""

    def __init__(self, model: nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return t


def training_memory(model: nn.Module, opt: torch.optim.Optimizer, saved_bytes: int) -> dict[str, float]:
    """Training memory in MiB after a step: weights and buffers, gradients, optimizer state, and the tensors
    saved for one step's backward (``saved_bytes``); ``total`` is their sum. Counted from the tensors
    themselves, so it is the same on every machine (the process's RSS is mostly the libraries)."""
    mib = 2.0**-20
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    out = {"weights": weights * mib, "grads": grads * mib, "optimizer": state * mib, "saved": saved_bytes * mib}
    out["total"] = sum(out.values())
    return out


def run(task: str | Task, variant: str | Variant, seed: int = 0, quick: bool = False, *, scale: float = 1.0,
        init: dict[str, torch.Tensor] | None = None, name: str | None = None, return_model: bool = False) -> Any:
    """Build, prepare with ``variant``, train and evaluate one model; returns metric, parameters and seconds.

    The model's initial weights, the data order and the estimator's samples are functions of ``seed`` (every
    variant of one seed starts from the same weights and sees the same batches). A converted model is scored
    after ``replace_wrap.merge``: what would be deployed.

    Args:
        task: A task or its name (:func:`get_task`).
        variant: A registered variant's name or a variant function.
        seed: The seed of weights, data order and samples.
        quick: The task's short budget.
        scale: Multiplies the number of steps (the training-length curve); the schedule stretches with it.
        init: A state dict loaded into the freshly built model before ``variant`` (pretrained weights).
        name: The variant's name in the result (default: the registered name or the function's).
        return_model: Return ``(result, trained model)`` (merged if it was converted).

    Returns:
        The metric's ``value``, ``trainable`` parameters, ``train_s``, ``steps``, the first and last training
        loss, ``memory`` (:func:`training_memory`, MiB) and the interpreter's version.
    """
    task = get_task(task) if isinstance(task, str) else task
    name = name or (variant if isinstance(variant, str) else getattr(variant, "__name__", "custom"))
    prepare = VARIANTS[variant] if isinstance(variant, str) else variant
    torch.manual_seed(seed)
    model = task.build()
    if init is not None:
        model.load_state_dict(init)
    out = prepare(model, task)
    model, groups = out if isinstance(out, tuple) else (out, None)
    if groups is None:
        groups = replace_wrap.param_groups(model, weight_decay=task.weight_decay)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = max(1, round((task.quick_steps if quick else task.steps) * scale))
    opt = torch.optim.AdamW(groups, lr=task.lr)
    # each group's own lr (a separate scalar lr) is its peak: OneCycleLR would otherwise set every group's to max_lr
    peaks = [g.get("lr", task.lr) for g in opt.param_groups]
    # 10% warm-up (at least 2 steps: OneCycleLR needs a warm-up phase longer than one step)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=max(steps, 4),
                                                pct_start=max(0.1, 2.5 / max(steps, 4)))
    torch.manual_seed(seed)  # the models are dropout-free: this seeds the estimator's samples only
    model.train()
    t0 = time.perf_counter()
    losses, memory = [], None
    for step, (x, y) in enumerate(batches(task, seed, steps)):
        saved = _SavedBytes(model) if step == 0 else None
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if saved else contextlib.nullcontext():
            loss = task_loss(model, task, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if saved:
            memory = training_memory(model, opt, saved.bytes)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    if any(isinstance(m, replace_wrap.ReplacementSite) for m in model.modules()):
        replace_wrap.merge(model)
    result = {
        "task": task.name, "variant": name, "seed": seed, "metric": task.metric, "value": evaluate(model, task, quick),
        "trainable": trainable, "total_params": sum(p.numel() for p in model.parameters()), "train_s": train_s,
        "steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "memory": memory,
        "python": sys.version.split()[0],
    }
    return (result, model) if return_model else result


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
