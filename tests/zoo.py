"""Model construction and checks for the compatibility matrix (timm families, HF vision models).

The timm families are derived from timm's registry, not listed by hand: a family is a model module plus the
alphabetic prefix of the model name (``resnet:seresnet``, ``vision_transformer:vit``), and its representative
is the variant with the fewest parameters (counted on the meta device, cached per timm version). Inputs are
capped: a model that takes ``img_size=`` is built at :data:`CAP` pixels, any other model that is not of fixed
input size runs at :data:`CAP` pixels; when that fails the model's own default size is used.

The check a model goes through (:func:`check`): convert with ``every=2``, forward and backward in train mode,
every site's ``a`` and ``b`` get gradients, eval forward, merge equals converted. Exclusions are named with a
reason (timm's test style) in :data:`TIMM_EXCLUDE`.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import replace_wrap

CAP = 64  # capped input size (pixels) where the model allows it
BATCH = 2  # train-mode BatchNorm needs more than one value per channel
MERGE_RTOL = 1e-6  # merge error is measured relative to the output's scale (max(1, |y|max))

# Families left out of the matrix, each with the reason (timm's exclusion-list style). Empty today: every
# family is built and checked; a family that cannot be converted must raise a typed error, never crash.
TIMM_EXCLUDE: dict[str, str] = {}


# --- timm --------------------------------------------------------------------------------------------------


def timm_families() -> dict[str, list[str]]:
    """``{"module:prefix": [model names]}`` for every timm architecture family (timm's ``test_*`` models apart)."""
    import timm
    from timm.models import _registry

    fams: dict[str, list[str]] = {}
    for name in timm.list_models():
        if name.startswith("test_"):
            continue
        prefix = re.match(r"[a-z]+", name)
        key = f"{_registry._model_to_module[name]}:{prefix.group(0) if prefix else name}"
        fams.setdefault(key, []).append(name)
    return fams


def timm_test_models() -> list[str]:
    """timm's own tiny ``test_*`` models (present in timm >= 1.0)."""
    import timm

    return timm.list_models("test_*")


def _cache_file() -> Path:
    import timm

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "replace_wrap"
    return root / f"timm-{timm.__version__}-param-counts.json"


def param_count(name: str) -> int:
    """Parameters of a timm model at its default config, counted on the meta device (no memory, cached)."""
    import timm

    path = _cache_file()
    cache: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
    if name not in cache:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        cache[name] = sum(p.numel() for p in model.parameters())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        tmp.replace(path)
    return cache[name]


def representative(models: list[str]) -> str:
    """The family's smallest variant (fewest parameters; ties: shortest, then first name)."""
    return min(models, key=lambda n: (param_count(n), len(n), n))


def build_timm(name: str, cap: int = CAP) -> tuple[nn.Module, torch.Tensor, int]:
    """A freshly initialised timm model, an input batch at a capped size, and that size.

    Tries the capped size first (``img_size=cap`` where the model takes it, else just a ``cap`` input for
    models without a fixed input size), then twice that, checking one eval forward each time, and falls
    back to the default size.
    """
    import timm

    cfg = timm.get_pretrained_cfg(name)
    default = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    lo = cfg.min_input_size[-1] if cfg is not None and cfg.min_input_size else 0
    fixed = bool(cfg is not None and cfg.fixed_input_size)
    attempts: list[tuple[dict[str, Any], int]] = []
    for size in sorted({max(cap, lo), max(2 * cap, lo)}):  # e.g. 64, then 128 (Inception needs > 75)
        if size < default[-1]:
            attempts.append(({"img_size": size}, size))
            if not fixed:
                attempts.append(({}, size))
    attempts.append(({}, default[-1]))
    last: Exception | None = None
    for kwargs, hw in attempts:
        torch.manual_seed(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
            x = torch.randn(BATCH, default[0], hw, hw)
            model.eval()
            with torch.no_grad():
                model(x[:1])
            model.train()
            return model, x, hw
        except Exception as exc:  # this size/kwarg does not fit the model: try the next
            last = exc
    raise RuntimeError(f"could not build {name} at any input size: {last}")


# --- the check ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the compatibility table."""

    model: str
    family: str = ""
    params: int = 0
    input: str = ""
    route: str = ""
    stacks: list[int] = field(default_factory=list)
    replaced: int = 0
    adapted: int = 0
    own: int = 0
    ratio: float = 1.0
    merge_err: float = float("nan")
    status: str = "error"
    reason: str = ""
    seconds: float = 0.0

    @property
    def converted(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _first_tensor(y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    for key in ("logits", "last_hidden_state", "pooler_output"):
        v = getattr(y, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(y, dict):
        return _first_tensor(next(iter(y.values())))
    if isinstance(y, (tuple, list)):
        return _first_tensor(y[0])
    raise TypeError(f"no tensor in the model output of type {type(y).__name__}")


def default_loss(y: Any) -> torch.Tensor:
    """The HF loss when the output has one, else the mean square of the first output tensor."""
    loss = getattr(y, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    return _first_tensor(y).float().square().mean()


def check(
    model: nn.Module,
    row: Row,
    train: Callable[[nn.Module], Any],
    evaluate: Callable[[nn.Module], Any] | None = None,
    require_loss: bool = False,
) -> Row:
    """Convert ``model`` (every=2) and run the contract on it; fill and return ``row``.

    Args:
        model: A freshly built model (it is converted and merged in place).
        row: The row to fill.
        train: Runs the model in train mode on a batch (``lambda m: m(x)``).
        evaluate: Runs it for the merge comparison (default: ``train``).
        require_loss: The train output must carry ``.loss`` (HF models called with labels).

    ``status`` is ``"ok"``, or ``"not converted"`` when convert raised a typed
    :class:`~replace_wrap.ReplaceWrapError` (its message is the reason). Anything else propagates: a crash is
    a failure of the matrix, not a row.
    """
    evaluate = evaluate or train
    t0 = time.perf_counter()
    row.params = sum(p.numel() for p in model.parameters())
    try:
        replace_wrap.convert(model, every=2)
    except replace_wrap.ReplaceWrapError as exc:
        rep = getattr(exc, "report", None)
        if rep is not None:
            row.route, row.stacks = rep.route, [n for _, n in rep.stacks]
        row.status, row.reason = "not converted", f"{type(exc).__name__}: {exc}"
        row.seconds = time.perf_counter() - t0
        return row
    rep = replace_wrap.report(model)
    row.route, row.stacks, row.replaced = rep.route, [n for _, n in rep.stacks], len(rep.replaced)
    row.adapted = sum(len(b.adapted) for b in rep.replaced)
    row.own = sum(len(b.kept_tensors) for b in rep.replaced)
    row.ratio = rep.trainable_ratio
    sites = [m for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite)]

    model.train()
    out = train(model)
    if require_loss and not isinstance(getattr(out, "loss", None), torch.Tensor):
        raise AssertionError(f"the converted model's output has no .loss: {type(out).__name__}")
    loss = default_loss(out)
    loss.backward()
    missing = [n for s in sites for n, p in s.named_parameters() if p.grad is None]
    if missing or not torch.isfinite(loss):
        raise AssertionError(f"train step: loss {loss.item()}, scalars without gradient: {missing[:4]}")
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        y_conv = _first_tensor(evaluate(model)).detach().clone()
    replace_wrap.merge(model)
    with torch.no_grad():
        y_merged = _first_tensor(evaluate(model))
    scale = max(1.0, y_conv.abs().max().item()) if y_conv.numel() else 1.0
    row.merge_err = (y_merged - y_conv).abs().max().item() / scale if y_conv.numel() else 0.0
    row.status = "ok"
    row.reason = "; ".join(
        part for part in (
            f"{row.adapted} tensors shape-adapted" if row.adapted else "",
            f"{row.own} kept as own" if row.own else "",
        ) if part
    )
    row.seconds = time.perf_counter() - t0
    if not (row.merge_err <= MERGE_RTOL):  # also catches NaN
        raise AssertionError(f"merged output differs from the converted one by {row.merge_err:.3g} (relative)")
    return row


def check_timm(name: str, family: str = "") -> Row:
    """Build ``name`` at a capped size and :func:`check` it."""
    row = Row(model=name, family=family)
    model, x, hw = build_timm(name)
    row.input = f"{hw}x{hw}"
    return check(model, row, lambda m: m(x))


def check_hf(name: str) -> Row:
    """Build the HF model ``name`` (see :mod:`zoo_hf`) and :func:`check` it, requiring ``.loss``."""
    from zoo_hf import BUILDERS

    torch.manual_seed(0)
    case = BUILDERS[name]()
    row = Row(model=f"{type(case.model).__name__} ({name})", family=f"hf:{name}")
    x = case.train_inputs.get("pixel_values")
    row.input = "x".join(map(str, x.shape[-2:])) if isinstance(x, torch.Tensor) else ""
    return check(
        case.model, row, lambda m: case.call(m, case.train_inputs), lambda m: case.call(m, case.eval_inputs),
        require_loss=True,
    )


# --- the generated page ------------------------------------------------------------------------------------


def write_matrix(rows: list[Row], path: Path, seconds: float, command: str) -> None:
    """Write ``docs/compatibility.md``: one line per model, pass rates, how it was measured."""
    import platform

    import timm
    import transformers

    timm_rows = [r for r in rows if not r.family.startswith("hf:")]
    hf_rows = [r for r in rows if r.family.startswith("hf:")]

    def rate(rs: list[Row]) -> str:
        ok = sum(r.converted for r in rs)
        return f"{ok} / {len(rs)} ({100 * ok / len(rs):.1f}%)" if rs else "n/a"

    lines = [
        "# Compatibility",
        "",
        "<!-- generated by `pytest -m compat tests/test_compat.py`; do not edit by hand -->",
        "",
        "Every timm architecture family (its smallest variant, `pretrained=False`) and 20 HF vision models",
        "(small configs, no hub) go through the same check: `convert(model, every=2)`, a forward and",
        "backward in train mode in which every replaced block's `a` and `b` get a gradient (HF models: with",
        "`labels`, and the output still has `.loss`), an eval forward, then `merge` and the merged model's",
        "output compared with the converted one's (error relative to the output scale `max(1, |y|)`).",
        "A family that cannot be converted must raise a typed `ReplaceWrapError` that says why; any other",
        "exception fails the matrix. Text, speech and multimodal models (with `generate` and the KV cache,",
        "and the plain `from_pretrained`) are on [their own page](compatibility_text.md).",
        "",
        f"- **timm families converted: {rate(timm_rows)}**",
        f"- **HF models converted: {rate(hf_rows)}**",
        f"- measured with timm {timm.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__}, on {platform.machine()} CPU ({torch.get_num_threads()} threads); matrix run "
        f"time {seconds / 60:.1f} min",
        f"- command: `{command}`",
        "",
        "Columns: *route* is the analysis route (`fx` graph, or the `structural` walk where the model does",
        "not trace); *stacks* the lengths of the stacks found; *replaced* the replaced blocks; *trainable*",
        "the trainable-parameter ratio after/before; *adapted* / *own* the replaced blocks' tensors mapped",
        "from neighbours of another shape / kept as the block's own parameters (see",
        "[shape adaptation](concepts.md#shape-adaptation)).",
        "",
    ]
    columns = ["family", "model", "params", "input", "route", "stacks", "replaced", "trainable", "adapted / own",
               "merge err", "status"]
    header = "| " + " | ".join(columns) + " |"
    sep = "|" + "---|" * len(columns)
    for title, rs in (("timm", timm_rows), ("HF transformers", hf_rows)):
        lines += [f"## {title}", "", header, sep]
        for r in sorted(rs, key=lambda r: r.family):
            status = "ok" if r.converted else f"{r.status}: {r.reason}"
            status = status.replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {r.family} | `{r.model}` | {_count(r.params)} | {r.input} | {r.route} | "
                f"{','.join(map(str, r.stacks))} | {r.replaced} | {r.ratio:.2f} | {r.adapted} / {r.own} | "
                f"{r.merge_err:.1e} | {status} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
