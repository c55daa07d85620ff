"""Shared fixtures: seeded toy models, the tolerance table and the oracle used by the contract tests."""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

# One tolerance table for the whole suite (absolute), keyed by what is compared.
TOL = {
    "merge": 1e-6,  # merged vs converted outputs, eval, fp32 (the bound)
    "oracle": 1e-5,  # outputs: converted vs a copy with hand-mixed weights (one rounding apart per weight)
    "exact": 0.0,
}

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and far more predictably when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rule_registry():
    """Rules registered inside a test are removed afterwards, so other tests see the built-in registry."""
    import replace_wrap.synthesis.rules

    saved = dict(replace_wrap.synthesis.rules._RULES)
    yield
    replace_wrap.synthesis.rules._RULES.clear()
    replace_wrap.synthesis.rules._RULES.update(saved)


ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str) -> ModuleType:
    """The script ``examples/<name>.py`` imported as a module (its ``main`` not run), to call its functions."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` in a subprocess from the checkout root, as a user runs it (never raises on failure).

    The subprocess imports this checkout first, and whatever else the test process can import; ``env`` adds
    environment variables.
    """
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
        env=dict(os.environ, PYTHONPATH=pythonpath, **env),
    )


def state_snapshot(model: torch.nn.Module) -> dict:
    """Everything analysis must not change: tensors (bitwise), parameter identity, modes, hooks, classes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "keys": list(model.state_dict().keys()),
        "param_ids": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        ],
        "dict_keys": sorted(model.__dict__),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["keys"] == after["keys"]
    for k, v in before["state"].items():  # bitwise, NaN included
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    for key in ("param_ids", "modes", "classes", "hooks", "dict_keys"):
        assert before[key] == after[key], key


def reference_adapt(t: torch.Tensor, shape, centre=()) -> torch.Tensor:
    """The documented slice / zero-pad rule, written independently of replace_wrap.synthesis.adapt (index slices).

    Per dimension, source entry ``j`` lands at target entry ``j + off`` where ``off = 0`` (start alignment)
    or ``floor((m - s) / 2)`` for growing and ``-floor((s - m) / 2)`` for shrinking centre-aligned dims.
    """
    centre = {d % len(shape) for d in centre}
    out = t.new_zeros(tuple(shape))
    src, dst = [], []
    for d, (s, m) in enumerate(zip(t.shape, shape)):
        off = 0 if d not in centre else ((m - s) // 2 if m >= s else -((s - m) // 2))
        lo, hi = max(0, off), min(m, s + off)  # target range covered by the source
        dst.append(slice(lo, hi))
        src.append(slice(lo - off, hi - off))
    out[tuple(dst)] = t[tuple(src)]
    return out


def kernel_dims(leaf: torch.nn.Module, name: str, ndim: int) -> tuple[int, ...]:
    """Centre-aligned dimensions by the documented rule: the kernel dims of a convolution weight."""
    return tuple(range(2, ndim)) if name == "weight" and isinstance(leaf, torch.nn.modules.conv._ConvNd) else ()


def neighbour_term(model: torch.nn.Module, nb_path: str, rel: str, target: torch.Tensor, centre) -> torch.Tensor:
    """A neighbour's tensor mapped to ``target``'s shape, or zeros when it has no counterpart of that rank."""
    try:
        t = model.get_parameter(f"{nb_path}.{rel}")
    except AttributeError:
        return torch.zeros_like(target)
    if t.dim() != target.dim():
        return torch.zeros_like(target)
    return reference_adapt(t, target.shape, centre)


def mix_error_bound(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, nxt: torch.Tensor, dtype) -> torch.Tensor:
    """How far a correctly rounded ``a * prev + b * nxt`` in ``dtype`` may lie from the exact value (elementwise).

    The scalars are rounded to ``dtype``, each product and the sum once: at most three roundings of the terms'
    magnitude, each of relative size ``eps``.
    """
    eps = torch.finfo(dtype).eps
    return 3 * eps * (a.double().abs() * prev.double().abs() + b.double().abs() * nxt.double().abs()) + 1e-30


def oracle_weights(original: torch.nn.Module, converted: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every replaced tensor (by full path): ``(exact a*prev + b*next in float64, its error bound)``.

    Written without the library's maths: the report says which blocks were replaced from which neighbours,
    the site gives the scalars, and neighbour tensors of another shape are mapped by :func:`reference_adapt`
    (a missing one counts as zeros).
    """
    import replace_wrap

    out = {}
    rep = replace_wrap.report(converted)
    with torch.no_grad():
        for block in rep.replaced:
            site = converted.get_submodule(block.path).replacement
            a, b = site.coefficients()
            for k, rel in enumerate(site.tensor_names):
                i = k if a.numel() > 1 else 0
                target = original.get_parameter(f"{block.path}.{rel}")
                layer_path, _, name = rel.rpartition(".")
                layer = original.get_submodule(f"{block.path}.{layer_path}" if layer_path else block.path)
                centre = kernel_dims(layer, name, target.dim())
                prev = neighbour_term(converted, block.prev, rel, target, centre)
                nxt = neighbour_term(converted, block.next, rel, target, centre)
                exact = a[i].double() * prev.double() + b[i].double() * nxt.double()
                out[f"{block.path}.{rel}"] = (exact, mix_error_bound(a[i], b[i], prev, nxt, target.dtype))
    return out


def synthesized_value(converted: torch.nn.Module, path: str) -> torch.Tensor:
    """The tensor a converted model synthesizes at ``path`` (read through the replaced layer)."""
    owner, _, name = path.rpartition(".")
    return getattr(converted.get_submodule(owner) if owner else converted, name)


def oracle_model(original: torch.nn.Module, converted: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the unconverted model holding, in place of each replaced tensor, the converted model's
    synthesized value, after checking it against the hand-computed ``a*prev + b*next`` (:func:`oracle_weights`,
    float64) within one dtype rounding.

    The copy then tests where the converted model uses its tensors (its forward), the check what they are;
    taking the checked values rather than a re-rounded float64 one keeps deep eval-mode CNNs, which amplify a
    last-bit difference, comparable at a tight tolerance.
    """
    oracle = copy.deepcopy(original)
    with torch.no_grad():
        for path, (exact, bound) in oracle_weights(original, converted).items():
            value = synthesized_value(converted, path)
            assert bool(((value.double() - exact).abs() <= bound).all()), f"{path} is not a*prev + b*next"
            oracle.get_parameter(path).copy_(value)
    return oracle
