"""The README's demo: `python -m replace_wrap demo`, its measurements, determinism, plot and errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

import replace_wrap
from replace_wrap import cli
from replace_wrap.cli.demo import DemoSettings, build_model, format_table, load_digits_data, train_run
from conftest import run_python

pytest.importorskip("timm")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo through the CLI, as a user runs it (two training subprocesses)."""
    out = tmp_path_factory.mktemp("demo")
    png, js = out / "demo.png", out / "demo.json"
    proc = run_python("-m", "replace_wrap", "demo", "--quick", "--plot", str(png), "--json", str(js))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, png, json.loads(js.read_text())


def test_demo_prints_the_comparison_table(quick_demo):
    proc, _, data = quick_demo
    out = proc.stdout
    for row in (
        "test accuracy",
        "trainable parameters",
        "training time (wall)",
        "training time (CPU)",
        "weights + grads + AdamW state",
        "peak RSS (process)",
        "peak RSS above baseline",
    ):
        assert re.search(rf"^{re.escape(row)}\s+\S", out, re.MULTILINE), row
    e2e, rep = data["runs"]["end-to-end"], data["runs"]["replaced"]
    ratio = rep["trainable"] / e2e["trainable"]
    assert re.search(
        rf"^trainable parameters\s+{e2e['trainable']:,}\s+{rep['trainable']:,}\s+{ratio:.2f}x",
        out,
        re.MULTILINE,
    )
    assert "What convert(model, every=2) replaces" in out  # the plan is shown before training
    assert "end-to-end" in proc.stderr and "step" in proc.stderr  # the tqdm progress bars


def test_demo_runs_share_budget_and_differ_only_by_conversion(quick_demo):
    _, _, data = quick_demo
    s = DemoSettings(**data["settings"])
    e2e, rep = data["runs"]["end-to-end"], data["runs"]["replaced"]
    planned = replace_wrap.plan(build_model(s), every=s.every)
    assert e2e["trainable"] == planned.trainable_before
    assert rep["trainable"] == planned.trainable_after < e2e["trainable"]
    assert sorted(rep["scalars"]) == [b.path for b in planned.replaced] == ["blocks.1", "blocks.3"]
    assert e2e["scalars"] == {}
    assert e2e["steps"] == rep["steps"] == len(e2e["losses"]) == len(rep["losses"]) > 0
    for run in (e2e, rep):
        assert len(run["curve"]) == s.epochs + 1  # at init, then after each epoch
        assert all(0.0 <= acc <= 1.0 for _, acc in run["curve"])
        assert run["train_time_s"] > 0 and run["peak_rss_bytes"] >= run["base_rss_bytes"] > 0
    for traj in rep["scalars"].values():
        assert len(traj) == rep["steps"] + 1 and traj[0] == [0.5, 0.5] and traj[-1] != [0.5, 0.5]

    # Per trainable fp32 tensor: itself, its gradient, AdamW's two moments (4 x 4 bytes per value) and
    # AdamW's step counter (a 4-byte scalar tensor). The replaced blocks' tensors are none of these.
    def expected(model):
        return sum(16 * p.numel() + 4 for p in model.parameters() if p.requires_grad)

    model = build_model(s)
    assert e2e["state_bytes"] == expected(model)
    assert rep["state_bytes"] == expected(replace_wrap.convert(model, every=s.every)) < e2e["state_bytes"]


def test_demo_plot_is_a_png(quick_demo):
    _, png, _ = quick_demo
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 1000 and height > 400


def test_demo_is_deterministic_for_a_seed():
    s = DemoSettings.quick(epochs=1, train_limit=96, test_limit=32)
    threads = torch.get_num_threads()
    first = train_run("replaced", s, progress=False)
    second = train_run("replaced", s, progress=False)
    other = train_run(
        "replaced", DemoSettings.quick(epochs=1, train_limit=96, test_limit=32, seed=1), progress=False
    )
    assert torch.get_num_threads() == threads  # the caller's settings are restored
    for key in ("losses", "scalars", "accuracy", "trainable"):
        assert first[key] == second[key], key
    assert first["losses"] != other["losses"]


def test_digits_split_is_fixed_and_stratified():
    x_train, y_train, x_test, y_test = load_digits_data(16)
    assert x_train.shape == (1347, 3, 16, 16) and x_test.shape == (450, 3, 16, 16)
    assert float(x_train.min()) >= -1.0 and float(x_train.max()) <= 1.0
    per_class = torch.bincount(torch.cat([y_train, y_test]))
    assert (torch.bincount(y_test) - per_class * 0.25).abs().max() <= 1  # stratified: 25% of each class
    again = load_digits_data(16)
    assert torch.equal(again[3], y_test)


@pytest.mark.parametrize("every", ["1", "0", "-2"])
def test_demo_rejects_a_bad_every(every, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--every", every])
    assert exc.value.code == 2
    assert f"every must be an integer >= 2, got {int(every)}" in capsys.readouterr().err


def test_demo_every_too_large_for_the_model_names_the_reason(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quick", "--every", "9"])
    assert exc.value.code == 2
    assert "convert found no block to replace" in capsys.readouterr().err


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"replace_wrap {replace_wrap.__version__}"


def test_format_table_ratios():
    s = DemoSettings.quick()
    run = {
        "accuracy": 0.9,
        "trainable": 1000,
        "train_time_s": 10.0,
        "train_cpu_s": 8.0,
        "state_bytes": 16000,
        "peak_rss_bytes": 2**30,
        "base_rss_bytes": 2**29,
        "steps": 16,
        "scalars": {},
        "report": "",
    }
    rep = run | {
        "accuracy": 0.81,
        "trainable": 600,
        "train_time_s": 11.0,
        "state_bytes": 9600,
        "scalars": {"blocks.1": [[0.5, 0.5], [0.25, 0.75]]},
        "report": "1 of 5 blocks replaced",
    }
    table = format_table({"end-to-end": run, "replaced": rep}, s)
    assert re.search(r"test accuracy\s+90\.0%\s+81\.0%\s+0\.90x \(-9\.0 pt\)", table)
    assert re.search(r"trainable parameters\s+1,000\s+600\s+0\.60x", table)
    assert re.search(r"training time \(wall\)\s+10\.0 s\s+11\.0 s\s+1\.10x", table)
    assert "blocks.1: a = 0.250, b = 0.750" in table
