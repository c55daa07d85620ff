"""The child process of ``replace-wrap bench``: one variant (or, paired, all of them) in a fresh interpreter.

Run as ``python -m replace_wrap.cli.bench_child`` with a JSON spec on stdin; prints ``RESULT {json}``. Kept apart
from :mod:`replace_wrap.cli.bench` (the command line, scheduling and the table) so that a child imports only what
the measured model needs.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

from ..errors import ReplaceWrapError

__all__ = [
    "SAMPLE", "VARIANTS", "BenchError", "build_model", "example_input", "model_factory", "paired_order", "train_steps",
    "warmed_up",
]

# name -> how the child prepares the model. "convert" entries are ReplaceConfig options; SAMPLE is replaced
# by --sample. Order is the default order of the table.
SAMPLE = "<sample>"
VARIANTS: dict[str, dict[str, Any]] = {
    "end-to-end": {"kind": "plain"},
    "freeze": {"kind": "freeze"},
    "replace-generic": {"kind": "convert", "options": {"fast_path": False}},
    "replace-exact": {"kind": "convert", "options": {"ab_grad_sample": "exact"}},
    "replace": {"kind": "convert", "options": {}},  # the defaults: convert(model, every=2)
    "replace-sampled": {"kind": "convert", "options": {"ab_grad_sample": SAMPLE}},
    "replace-lean": {"kind": "convert", "options": {"recompute": True}},
    "infer-original": {"kind": "infer"},
    "infer-merged": {"kind": "infer-merged"},
}
DEFAULT_VARIANTS = ("end-to-end", "freeze", "replace-generic", "replace-exact", "replace", "replace-lean")


class BenchError(ReplaceWrapError):
    """A benchmark could not run: a bad model spec or argument, or a child process failed."""


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import replace_wrap

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec.get("paired"):
        return _paired(spec)
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    make = model_factory(spec["model"])
    _warm_libraries(device)
    rss_libs = _rss_mib()  # libraries loaded and paged in, nothing built: the CPU memory figures start here
    model = make(spec["size"], spec["num_classes"], spec["sets"]).to(device)
    x = example_input(model, spec, device)
    variant = VARIANTS[spec["variant"]]
    convert_s = _prepare(model, spec["variant"], spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(replace_wrap.param_groups(model, weight_decay=0.01), lr=1e-4)  # no decay on a, b
    if variant["kind"] == "infer-merged":
        train_steps(model, x, spec, 1, opt)  # the scalars move off their init, then materialize
        replace_wrap.merge(model)
        # the training step's optimizer state and gradients are no part of the merged model's inference
        opt = None
        model.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cuda = device.type == "cuda"
    infer = variant["kind"] in ("infer", "infer-merged")
    model = _compiled(model, spec)
    if infer:
        _infer_steps(model, x, spec, spec["warmup"])
    else:  # warm-up first: optimizer state, lazily loaded kernels and allocator pools are not step memory
        train_steps(model, x, spec, spec["warmup"], opt)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        memory = ("RSS high-water mark over the timed steps" if _reset_peak_rss() else "RSS high-water mark")
        memory += " minus RSS with the libraries loaded"
        before = _rss_mib()
    if infer:
        times = _infer_steps(model, x, spec, spec["steps"])
    else:
        times = train_steps(model, x, spec, spec["steps"], opt)
    saved = None if infer or spec.get("compile") else _saved_mib(model, x, spec)
    if cuda:
        peak, memory = torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
        step_peak = peak - before
    else:
        rss_peak = _peak_rss_mib()
        peak, step_peak = rss_peak - rss_libs, rss_peak - before
    return {"variant": spec["variant"], "trainable": trainable, "step_ms": [t[0] for t in times],
            "cpu_ms": [t[1] for t in times], "peak_mib": peak, "delta_mib": step_peak, "saved_mib": saved,
            "convert_s": convert_s, "memory": memory, "compile": _compile_stats(spec), "input": list(x.shape)}


def example_input(model: Any, spec: dict[str, Any], device: Any) -> Any:
    """Random token ids for a model that reads ``input_ids`` (an HF language model), else a float batch."""
    import torch

    g = torch.Generator().manual_seed(1)
    if getattr(model, "main_input_name", None) == "input_ids":
        vocab = model.config.vocab_size
        return torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g).to(device)
    return torch.randn(spec["batch"], *spec["input_shape"], generator=g).to(device)


def _compiled(model: Any, spec: dict[str, Any]) -> Any:
    if not spec.get("compile"):
        return model
    import torch

    torch._dynamo.utils.counters.clear()
    return torch.compile(model)


def _compile_stats(spec: dict[str, Any]) -> dict[str, int] | None:
    """Graphs compiled, graph breaks and recompilations counted by dynamo (``None`` without ``--compile``)."""
    if not spec.get("compile"):
        return None
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "breaks": int(sum(counters["graph_break"].values())),
            "recompiles": int(sum(counters["recompiles"].values()))}


def _warm_libraries(device: Any) -> None:
    # The first backward and optimizer step page in ~200 MiB of torch's own code and tables on CPU; do that on a
    # toy so that it counts with the libraries, not with the model's training memory.
    import torch

    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)).to(device)
    layer(torch.randn(2, 3, 8, 8, device=device)).sum().backward()
    torch.optim.AdamW(layer.parameters()).step()


def _prepare(model: Any, name: str, spec: dict[str, Any]) -> float | None:
    """Freeze or convert ``model`` in place as variant ``name`` says; the seconds ``convert`` took, if any."""
    import replace_wrap

    variant = VARIANTS[name]
    policy = _policy(spec)
    if variant["kind"] == "freeze":
        for block in replace_wrap.plan(model, policy=policy).replaced:
            for rel in block.fused:
                model.get_parameter(f"{block.path}.{rel}").requires_grad_(False)
    elif variant["kind"] in ("convert", "infer-merged"):
        options = {k: (spec["sample"] if v == SAMPLE else v) for k, v in variant.get("options", {}).items()}
        t0 = time.perf_counter()
        replace_wrap.convert(model, policy=policy, **options)
        return time.perf_counter() - t0
    return None


def _paired(spec: dict[str, Any]) -> dict[str, Any]:
    """Every training variant in one process, one step of each in turn (in the order of :func:`paired_order`).

    The variants share every moment of the machine's load, so their time ratios hold even when other
    processes come and go (the memory figures need one process per variant and come from there).
    """
    runs = {name: warmed_up(spec, name) for name in spec["paired"]}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for step in range(spec["steps"]):
        for name in paired_order(list(runs), step):
            model, x, opt = runs[name]
            times[name] += train_steps(model, x, spec, 1, opt)
    return {"paired": {name: {"step_ms": [t[0] for t in ts], "cpu_ms": [t[1] for t in ts]}
                       for name, ts in times.items()}}


def warmed_up(spec: dict[str, Any], name: str) -> tuple[Any, Any, Any]:
    """``(model, input, optimizer)`` of training variant ``name``, built (the same initial weights for every
    variant), prepared and stepped ``spec["warmup"]`` times: what the paired and lockstep steps time."""
    import torch

    import replace_wrap

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    model = model_factory(spec["model"])(spec["size"], spec["num_classes"], spec["sets"]).to(device)
    x = example_input(model, spec, device)
    _prepare(model, name, spec)
    opt = torch.optim.AdamW(replace_wrap.param_groups(model, weight_decay=0.01), lr=1e-4)  # no decay on a, b
    model = _compiled(model, spec)
    train_steps(model, x, spec, spec["warmup"], opt)
    return model, x, opt


def paired_order(names: list[str], step: int) -> list[str]:
    """The order of the variants in paired step ``step``: rotated by one each step, so that over any
    ``len(names)`` steps each variant takes each place once. A fixed order would time a variant always right
    after the same other one, in the caches and the allocator state that one leaves."""
    k = step % len(names)
    return names[k:] + names[:k]


def build_model(name: str, size: int, num_classes: int, sets: dict[str, Any]) -> Any:
    """Build the model named by a bench model spec (see the module docstring); never downloads weights."""
    return model_factory(name)(size, num_classes, sets)


def model_factory(name: str) -> Any:
    """``make(size, num_classes, sets) -> model`` for a bench model spec; imports what it needs now."""
    kind, sep, rest = name.partition(":")
    if not sep:
        kind, rest = "timm", name
    if kind == "timm":
        import timm

        def make_timm(size: int, num_classes: int, sets: dict[str, Any]) -> Any:
            try:
                return timm.create_model(rest, pretrained=False, num_classes=num_classes, img_size=size, **sets)
            except TypeError as exc:  # CNNs take no img_size
                if "img_size" not in str(exc):
                    raise
                return timm.create_model(rest, pretrained=False, num_classes=num_classes, **sets)

        return make_timm
    if kind == "hf":
        import transformers
        from transformers import AutoConfig

        def make_hf(size: int, num_classes: int, sets: dict[str, Any]) -> Any:
            cfg = AutoConfig.for_model(rest, **sets)
            # a decoder language model (llama, gpt2 ...) is built for causal LM, anything else for images
            causal = rest in transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            if causal and "use_cache" not in sets:  # training steps build no KV cache (recompute=True replays
                cfg.use_cache = False  # no block that is handed one)
            if not causal and "image_size" not in sets and hasattr(cfg, "image_size"):
                cfg.image_size = size
            if not causal and "num_labels" not in sets:
                cfg.num_labels = num_classes
            auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForImageClassification
            return auto.from_config(cfg)

        return make_hf
    try:
        obj: Any = importlib.import_module(kind)
        for attr in rest.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as exc:
        raise BenchError(f"cannot load {name!r} ({exc}); use timm:NAME, hf:MODEL_TYPE or package.module:factory") \
            from None
    return lambda size, num_classes, sets: obj(**sets)


def _policy(spec: dict[str, Any]) -> Any:
    import replace_wrap

    if spec["pattern"]:
        return replace_wrap.Pattern(include=spec["pattern"])
    return replace_wrap.Every(spec["every"] or 2)


def _loss(out: Any) -> Any:
    import torch
    import torch.nn.functional as F

    y = out if hasattr(out, "dim") else getattr(out, "logits", None)
    if y is None:
        y = out[0]
    y = y.float()
    if y.dim() < 2:
        return y.square().mean()
    logits = y.reshape(-1, y.shape[-1])
    target = torch.arange(logits.shape[0], device=logits.device) * 7919 % logits.shape[-1]  # fixed, spread
    return F.cross_entropy(logits, target)


def _autocast(spec: dict[str, Any], device: Any) -> Any:
    import contextlib

    import torch

    if spec["dtype"] == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, spec["dtype"]))


def train_steps(model: Any, x: Any, spec: dict[str, Any], n: int, opt: Any) -> list[tuple[float, float]]:
    import torch

    model.train()
    times = []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        with _autocast(spec, x.device):
            loss = _loss(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3))
    return times


def _infer_steps(model: Any, x: Any, spec: dict[str, Any], n: int) -> list[tuple[float, float]]:
    import torch

    model.eval()
    times = []
    with torch.no_grad(), _autocast(spec, x.device):
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3))
    return times


def _saved_mib(model: Any, x: Any, spec: dict[str, Any]) -> float:
    """MiB of the parameters plus the tensors autograd keeps from one forward for the backward.

    Deterministic, unlike a high-water mark: each storage counts once, whatever the allocator does. The
    parameters are in so that a replaced block's synthesized weights, kept for its backward, weigh against
    the frozen block's own. Inside checkpointed blocks (``recompute=True``) only what the checkpoint keeps
    outside is seen. Runs after the timed steps, so the peak figures do not include it.
    """
    import torch

    seen = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(spec, x.device):
        loss = _loss(model(x))
    del loss
    return sum(seen.values()) / 2**20


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _reset_peak_rss() -> bool:
    # Linux resets the RSS high-water mark (VmHWM) on writing 5 to clear_refs; elsewhere the peak stays the
    # whole process's (model construction included), and the table says so.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def main() -> int:
    """Read a spec from stdin, run it, print ``RESULT {json}``."""
    spec = json.loads(sys.stdin.read())
    result = _child(spec)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
