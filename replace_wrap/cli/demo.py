"""The demo behind ``replace-wrap demo``: train a small ViT on digits end-to-end and replaced, and compare.

Both runs train the same ViT (built from a config with timm, no download) on scikit-learn's bundled digits
(1,797 8x8 images, upsampled and repeated to 3 channels; one fixed stratified 75/25 split), with the same
seed, data order, optimizer and number of steps. The only difference: the second run is first converted with
``replace_wrap.convert(model, every=k)``.

Each run happens in a fresh Python subprocess, one after the other, so that

* the peak-memory figure is the subprocess's own RSS high-water mark (``getrusage``), not polluted by the other
  run or by the parent, and both runs pay the same import and data-loading baseline;
* the training times do not share the CPU with each other.

The peak is reported twice: the whole process (what ``top`` shows: Python, torch, data included) and the part
above the baseline taken just before the model is built (model, gradients, optimizer state, activations).
Training time counts the optimizer steps only (the per-epoch evaluation is excluded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..selection.policies import Every
from .demo_table import format_table

__all__ = ["DemoSettings", "build_model", "format_table", "load_digits_data", "run_demo", "train_run"]

MODES = ("end-to-end", "replaced")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines one demo run; both runs of a demo share it.

    The default model is a ViT of 8 blocks (width 64, 4 heads, MLP ratio 2) on 16x16 inputs cut into 4x4
    patches: small enough to train in well under a minute per run on one CPU thread, deep enough that
    ``every=2`` replaces three blocks.
    """

    epochs: int = 20
    every: int = 2
    seed: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    img_size: int = 16
    patch_size: int = 4
    dim: int = 64
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 2.0
    # Small models train fastest on one thread; more threads mostly add synchronisation, and badly so on a
    # busy machine. A fixed count also keeps the results bit-identical from run to run.
    threads: int = 1
    train_limit: int | None = None  # use only the first n training / test images (quick runs)
    test_limit: int | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        """A tiny run (seconds) that exercises every part of the demo; used by the tests."""
        base = {
            "epochs": 2,
            "depth": 5,
            "dim": 32,
            "heads": 2,
            "batch_size": 32,
            "train_limit": 256,
            "test_limit": 128,
        }
        return cls(**(base | overrides))

    def __post_init__(self) -> None:
        Every(self.every)  # raises PolicyError naming the value, before any subprocess starts
        for name in ("epochs", "batch_size", "depth", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --- data and model ---------------------------------------------------------------------------------------


def load_digits_data(
    img_size: int = 16, train_limit: int | None = None, test_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``, images ``(n, 3, img_size, img_size)``.

    The split is fixed (stratified, 25% test, ``random_state=0``) whatever the seed, so every run of the demo
    is scored on the same 450 test images.

    Example:
        >>> x_train, y_train, x_test, y_test = load_digits_data(16, train_limit=8, test_limit=4)
        >>> tuple(x_train.shape), tuple(x_test.shape), y_train.dtype
        ((8, 3, 16, 16), (4, 3, 16, 16), torch.int64)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (n, 1, 8, 8) in [0, 1]
    x = nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()  # (n, 3, img_size, img_size) in [-1, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        list(range(len(y))), test_size=0.25, stratify=digits.target, random_state=0
    )
    train_idx, test_idx = train_idx[:train_limit], test_idx[:test_limit]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def build_model(s: DemoSettings) -> nn.Module:
    """The demo's ViT, built from a config with timm (random init, nothing downloaded)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:  # the demo needs timm; the library does not
        raise SystemExit(
            "the demo builds its ViT with timm, which is not installed: pip install 'replace-wrap[timm]' "
            "(or run it through `bash .ci/venv python -m replace_wrap demo`)"
        ) from exc
    return VisionTransformer(
        img_size=s.img_size,
        patch_size=s.patch_size,
        in_chans=3,
        num_classes=10,
        embed_dim=s.dim,
        depth=s.depth,
        num_heads=s.heads,
        mlp_ratio=s.mlp_ratio,
        class_token=False,
        global_pool="avg",
    )


# --- one run ----------------------------------------------------------------------------------------------


def train_run(mode: str, s: DemoSettings, progress: bool = True) -> dict[str, Any]:
    """Train one run (``"end-to-end"`` or ``"replaced"``) and return its measurements as plain data.

    Returns a dict with ``accuracy`` (final test accuracy), ``trainable``, ``train_time_s``, ``curve``
    (``[train_time_s, test_accuracy]`` after each epoch, starting at ``[0, accuracy at init]``), ``losses``
    (per step), ``scalars`` (replaced runs: ``{block path: [[a, b] at init, after step 1, ...]}``),
    ``peak_rss_bytes`` and ``base_rss_bytes``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(mode, s, progress)
    finally:  # a caller's process keeps its own settings
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(mode: str, s: DemoSettings, progress: bool) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = load_digits_data(s.img_size, s.train_limit, s.test_limit)
    base_rss = _peak_rss()  # the baseline: interpreter, torch, timm and the data, before any model exists

    torch.manual_seed(s.seed)  # the same initial weights in both runs
    model = build_model(s)
    if mode == "replaced":
        api.convert(model, every=s.every)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The usual ViT recipe: no weight decay on 1-d tensors (biases, norms), which also keeps the replaced
    # blocks' scalars a, b (shape (1,)) free of a pull towards 0.
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=s.lr)
    steps_per_epoch = max(1, len(y_train) // s.batch_size)
    total = s.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total, pct_start=0.1)
    order = torch.Generator().manual_seed(s.seed)  # the same data order in both runs

    replaced = mode == "replaced"
    scalars = {path: [ab] for path, ab in _scalars(model).items()} if replaced else {}
    curve = [[0.0, _accuracy(model, x_test, y_test)]]
    losses: list[float] = []
    train_time = cpu_time = 0.0
    bar = _progress(total, mode, s, progress)
    for epoch in range(s.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=order)
        for i in range(steps_per_epoch):
            batch = perm[i * s.batch_size : (i + 1) * s.batch_size]
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            train_time += time.perf_counter() - start
            cpu_time += time.process_time() - start_cpu
            losses.append(loss.item())
            if replaced:
                for path, ab in _scalars(model).items():
                    scalars[path].append(ab)
            bar.set_postfix(
                {
                    "epoch": f"{epoch + 1}/{s.epochs}",
                    "loss": f"{losses[-1]:.3f}",
                    "test acc": f"{curve[-1][1]:.3f}",
                },
                refresh=False,
            )
            bar.update(1)
        curve.append([train_time, _accuracy(model, x_test, y_test)])
    bar.set_postfix(
        {"epoch": f"{s.epochs}/{s.epochs}", "loss": f"{losses[-1]:.3f}", "test acc": f"{curve[-1][1]:.3f}"}
    )
    bar.close()
    out = {
        "mode": mode,
        "accuracy": curve[-1][1],
        "trainable": sum(p.numel() for p in trainable),
        "train_time_s": train_time,
        "train_cpu_s": cpu_time,
        "steps": total,
        "curve": curve,
        "losses": losses,
        "scalars": scalars,
        "state_bytes": _training_state_bytes(model, opt),
        "peak_rss_bytes": _peak_rss(),
        "base_rss_bytes": base_rss,
        "report": api.report(model).summary() if replaced else "",
    }
    return out


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _training_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes held by the model's parameters, their gradients and the optimizer's state, counted tensor by tensor.

    Measured after the last step, while the gradients still exist. A replaced tensor is no parameter, so it
    has neither gradient nor optimizer state; what it costs is its transient synthesis during forward.
    """
    tensors = {id(p): p for p in model.parameters()}
    tensors |= {id(p.grad): p.grad for p in model.parameters() if p.grad is not None}
    tensors |= {id(t): t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _scalars(model: nn.Module) -> dict[str, list[float]]:
    """``{block path: [a, b]}`` of every replaced block of a converted model."""
    return {b.path: [b.scalars["a"][0], b.scalars["b"][0]] for b in api.report(model).replaced}


def _progress(total: int, mode: str, s: DemoSettings, enabled: bool) -> Any:
    desc = "end-to-end" if mode == "end-to-end" else f"every={s.every}   "
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety: train without them
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, *args: Any, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _peak_rss() -> int:
    """The process's RSS high-water mark in bytes (0 where ``resource`` does not exist, i.e. Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes


# --- the two runs, the table, the plot ----------------------------------------------------------------------


def run_demo(
    epochs: int | None = None,
    every: int = 2,
    seed: int = 0,
    plot: str | os.PathLike[str] | None = None,
    quick: bool = False,
    threads: int | None = None,
    json_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> int:
    """Train end-to-end and replaced, each in a fresh subprocess; print the comparison; optionally plot it."""
    options: dict[str, Any] = {"every": every, "seed": seed}
    if epochs is not None:
        options["epochs"] = epochs
    if threads is not None:
        options["threads"] = threads
    s = DemoSettings.quick(**options) if quick else DemoSettings(**options)
    started = time.perf_counter()
    model = build_model(s)
    print(
        f"replace_wrap demo: a ViT of {s.depth} blocks (width {s.dim}) on scikit-learn digits "
        f"({s.img_size}x{s.img_size}, 3 channels), {s.epochs} epochs, seed {s.seed}, {s.threads} thread(s)"
    )
    api.convert(model, every=s.every)  # a throwaway copy: any error shows here, before training starts
    print(f"\nWhat convert(model, every={s.every}) replaces (replace_wrap.report):")
    print(api.report(model))
    del model
    results = {}
    for mode in MODES:
        title = "end-to-end" if mode == "end-to-end" else f"replaced, convert(model, every={s.every})"
        print(f"\n== training {title}", flush=True)
        results[mode] = _run_in_subprocess(mode, s, progress)
    print()
    print(format_table(results, s))
    if plot is not None:
        from .demo_plot import plot_demo

        plot_demo(results, s, plot)
        print(f"\nplot written to {plot}")
    if json_path is not None:
        Path(json_path).write_text(json.dumps({"settings": dataclasses.asdict(s), "runs": results}, indent=1))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


def _run_in_subprocess(mode: str, s: DemoSettings, progress: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="replace_wrap_demo_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "replace_wrap.cli.demo",
            "--mode",
            mode,
            "--settings",
            json.dumps(dataclasses.asdict(s)),
            "--out",
            str(out),
        ]
        if not progress:
            cmd.append("--no-progress")
        env = dict(os.environ)
        # The child imports this very package, wherever it was imported from here (a checkout or site-packages).
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.run(
            cmd, env=env, check=False
        )  # stdout/stderr inherited: the progress bar shows live
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"the {mode} run failed (exit code {proc.returncode}); its error is printed above"
            )
        return json.loads(out.read_text())


def _worker(argv: list[str] | None = None) -> int:
    """Subprocess entry point: one run, its measurements written as JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m replace_wrap.cli.demo")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--settings", required=True, help="DemoSettings as JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    s = DemoSettings(**json.loads(args.settings))
    result = train_run(args.mode, s, progress=not args.no_progress)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
