"""The oldest torch that pyproject.toml admits runs the core suite (issue 11, defect 6: the floor is tested).

The suite otherwise runs on the pinned torch of .ci/constraints.txt. This test builds (once, cached beside the
project's venv) an environment with the floor release from a local wheel, and runs the tests that need nothing
but torch in it. Without a local wheel of the floor release it skips and says so: downloading a registry build
of torch is several GB.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

# Tests that need only torch (and pytest/hypothesis); the model-zoo ones are excluded by name below.
CORE = [
    "tests/test_contract.py", "tests/test_mixed_ops.py", "tests/test_layer_kernels.py", "tests/test_rules.py",
    "tests/test_references.py", "tests/test_errors.py", "tests/test_optimizers.py", "tests/test_adapt.py",
    "tests/test_fit.py", "tests/test_policy.py", "tests/test_layout.py",
]
NEEDS_ZOO = "not Timm and not HF and not hf and not swinv2"


def _floor() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("torch")]
    match = re.fullmatch(r"torch>=([\d.]+)", spec.replace(" ", ""))
    assert match, f"torch must be declared as torch>=X.Y, got {spec!r}"
    return match.group(1)


def _local_wheel(version: str) -> Path | None:
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d] + ["/opt/wheels"]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for d in dirs:
        for wheel in sorted(Path(d).glob(f"torch-{version}*-{tag}-*.whl")) if Path(d).is_dir() else []:
            return wheel
    return None


@pytest.mark.timeout(900)
def test_core_suite_passes_on_the_oldest_supported_torch():
    floor = _floor()
    wheel = _local_wheel(floor)
    if wheel is None:
        pytest.skip(f"no local wheel of torch {floor} (the declared floor) for this Python; not downloading one")
    root = Path(os.environ.get("REPLACE_WRAP_VENV_ROOT") or Path.home() / ".cache" / "replace_wrap")
    venv = root / f"floor-{hashlib.sha256(str(wheel).encode()).hexdigest()[:12]}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        env = dict(os.environ, PIP_CONFIG_FILE="/dev/null", PIP_FIND_LINKS="")
        index = [f"--extra-index-url=file://{d}" for d in ("/opt/pypi/simple", "/opt/pypi-more/simple") if Path(d).is_dir()]
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--no-cache-dir", *index, str(wheel), "pytest>=8",
             "pytest-timeout", "hypothesis"],
            check=True, env=env, timeout=800,
        )
        (venv / ".complete").touch()
    out = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not compat and not slow", "-k", NEEDS_ZOO,
         *CORE],
        cwd=ROOT, capture_output=True, text=True, timeout=800,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    assert version.startswith(floor), version
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"\d+ passed", out.stdout), out.stdout[-2000:]
