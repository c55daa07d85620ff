"""Package hygiene: lean import, sorted and typed public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import replace_wrap


def test_import_is_lean():
    code = (
        "import sys, replace_wrap; "
        "print(','.join(m for m in ('timm', 'transformers', 'torchvision', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_is_sorted_and_complete():
    names = replace_wrap.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(replace_wrap, name), name


def test_public_names_have_docstrings():
    missing = [n for n in replace_wrap.__all__ if not n.startswith("__") and not (getattr(replace_wrap, n).__doc__ or "").strip()]
    assert not missing


def test_typed_marker_and_version():
    assert (Path(replace_wrap.__file__).parent / "py.typed").is_file()
    major, minor, *_ = replace_wrap.__version__.split(".")
    assert major.isdigit() and minor.isdigit()


def test_works_without_numpy():
    """numpy is no dependency of replace_wrap (issue 11, defect 6): with it unimportable, a whole-model policy (whose
    solver once used numpy) still converts."""
    code = (
        "import sys, warnings; sys.modules['numpy'] = None; warnings.simplefilter('ignore');"
        "import torch, replace_wrap;"
        "net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(9)]);"
        "replace_wrap.convert(net, policy=replace_wrap.Budget(0.7)); print(len(replace_wrap.report(net).replaced))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
    sources = "\n".join(p.read_text() for p in Path(replace_wrap.__file__).parent.rglob("*.py"))
    assert "import numpy" not in sources and "from numpy" not in sources
