"""DDP on CPU (gloo, 2 processes) with the example script; FSDP2 and DDP at 4 ranks are in test_fsdp.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _run(args: list[str], timeout: int) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.timeout(120)
def test_ddp_example_trains_in_step_across_ranks(tmp_path):
    # examples/ddp.py: convert, then plain DistributedDataParallel(model) (no find_unused_parameters); an
    # unused parameter would make DDP raise from the second step on.
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    _run(["examples/ddp.py", "--steps", "3", "--depth", "5", "--batch-size", "8", "--out", str(tmp_path)], 110)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert list(r0["state"]) == list(r1["state"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    scalars = [k for k in r0["state"] if ".replacement." in k]
    assert scalars == [f"blocks.{i}.replacement.{n}" for i in (1, 3) for n in "ab"]
    assert all(not torch.equal(r0["state"][k], torch.tensor([0.5])) for k in scalars)  # a, b were trained
    assert len(r0["losses"]) == 3 and all(torch.isfinite(torch.tensor(r0["losses"] + r1["losses"])))
