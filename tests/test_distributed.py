"""DDP and FSDP2 on CPU (gloo, 2 processes), and the FSDP unit grouping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import replace_wrap
from toys import ResidualMLP

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _paths(*indices: int) -> tuple[str, ...]:
    return tuple(f"blocks.{i}" for i in indices)


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


@pytest.mark.timeout(120)
def test_fsdp2_shard_on_cpu_matches_single_process(tmp_path):
    _run([str(ROOT / "tests" / "_fsdp_worker.py"), str(tmp_path)], 110)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for every in (2, 3):
        assert r0[f"sharded_{every}"]  # the parameters really are DTensors
        assert r0[f"losses_{every}"] == r0[f"ref_losses_{every}"]
        for k, ref in r0[f"ref_state_{every}"].items():
            torch.testing.assert_close(r0[f"state_{every}"][k], ref, atol=1e-6, rtol=1e-6, msg=k)
            assert torch.equal(r0[f"state_{every}"][k], r1[f"state_{every}"][k]), k
    assert r0["units_3"] == [_paths(0), _paths(1, 2, 3), _paths(4, 5, 6), _paths(7)]
    # why the recipe exists: one unit per block fails as soon as a replaced block reads a sharded neighbour
    assert "mixed torch.Tensor and DTensor" in r0["naive_error"]


@pytest.mark.parametrize(
    ("depth", "policy", "units"),
    [
        (6, replace_wrap.Every(2), [_paths(0, 1, 2, 3, 4), _paths(5)]),
        (7, replace_wrap.Indices([1, 5]), [_paths(0, 1, 2), _paths(3), _paths(4, 5, 6)]),
    ],
)
def test_fsdp_units_group_each_replaced_block_with_its_neighbours(depth, policy, units):
    model = replace_wrap.convert(ResidualMLP(depth=depth), policy=policy)
    assert replace_wrap.fsdp_units(model) == units
    with pytest.raises(replace_wrap.NotConvertedError):
        replace_wrap.fsdp_units(ResidualMLP())
