"""`replace-wrap bench` end to end on a tiny model (one round, a couple of steps), plus its argument errors."""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics

import pytest

from replace_wrap import ReplaceWrapError
from replace_wrap.cli import main
from replace_wrap.cli.bench import BenchError, build_model, format_table, median_interval, run_bench
from replace_wrap.cli.bench_child import paired_order
from replace_wrap.cli.bench_lockstep import lockstep_times

TESTS = str(pathlib.Path(__file__).parent)


@pytest.fixture
def toys_importable(monkeypatch):
    # the children are fresh interpreters: they find tests/toys.py through PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))


def test_bench_json_end_to_end(toys_importable, capsys):
    variants = "end-to-end,freeze,replace-sampled,infer-original,infer-merged"
    code = main(["bench", "toys:ResidualMLP", "--input-shape", "8", "--batch", "64", "--steps", "2", "--warmup",
                 "1", "--rounds", "1", "--variants", variants, "--set", "depth=6", "--sample", "0.25", "--threads", "1",
                 "--paired", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == variants.split(",")
    # parameter accounting: ResidualMLP(depth=6, width=16) has blocks of 2*16*32 + 32 + 16 + 2*16 (norm) = 1104
    # parameters; every=2 replaces blocks 1 and 3; the freeze baseline and replace keep the same trainables
    # except for the 2 scalars per replaced block.
    e2e = rows["end-to-end"]["trainable"]
    assert rows["freeze"]["trainable"] == e2e - 2 * 1104
    assert rows["replace-sampled"]["trainable"] == e2e - 2 * 1104 + 4
    assert rows["infer-merged"]["trainable"] == rows["infer-original"]["trainable"] == e2e  # merged: plain again
    for row in rows.values():
        assert len(result["runs"][row["variant"]][0]["step_ms"]) == 2
        assert row["step_ms"]["min"] <= row["step_ms"]["median"] <= row["step_ms"]["max"]
        assert row["peak_mib"] > 0
        if row["variant"].startswith("infer"):  # inference compares with the original model's inference
            assert row["vs_freeze"] is None and row["vs_original"]["step"] > 0
            continue
        assert row["vs_freeze"]["step"] == pytest.approx(row["step_ms"]["median"] / rows["freeze"]["step_ms"]["median"])
        assert row["saved_mib"] > 0
        # paired: every training variant timed a step of each in turn, as many steps as all its rounds
        # together, split between the two paired processes (one step each here)
        assert len(result["paired"][row["variant"]]["step_ms"]) == 2
        steps = zip(result["paired"][row["variant"]]["step_ms"], result["paired"]["freeze"]["step_ms"])
        assert row["vs_freeze"]["paired"] == pytest.approx(statistics.median(a / b for a, b in steps))
    assert rows["replace-sampled"]["convert_s"] is not None and rows["freeze"]["convert_s"] is None
    assert rows["freeze"]["vs_freeze"]["step"] == 1.0 and rows["end-to-end"]["vs_end_to_end"]["peak"] == 1.0
    assert len(result["loadavg"]) == len(variants.split(",")) + 2  # + the two paired processes
    training = ["end-to-end", "freeze", "replace-sampled"]
    assert result["paired_orders"] == [training, training[::-1]]  # built and stepped in opposite orders
    assert "[" in out.err  # the progress bar
    table = format_table(result)
    assert "| replace-sampled |" in table and "load average" in table and "paired ms" in table
    assert "inference (no_grad forward): merged model" in table
    assert "mmap threshold" not in table
    assert rows["replace-sampled"]["vs_freeze"]["paired_ci"] is None  # 2 paired steps: too few for 95%
    rows["replace-sampled"]["vs_freeze"]["paired_ci"] = [0.97, 1.04]
    assert "| 0.97 [0.97-1.04] |" not in table and " [0.97-1.04] |" in format_table(result)
    result["spec"]["child_env"] = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
    assert "time: with glibc's mmap threshold lowered" in format_table(result)  # its times include page faults
    # raised (nothing mapped, nothing faulted in again): no such note
    result["spec"]["child_env"] = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4294967296:"
                                                     "glibc.malloc.mmap_threshold=4294967296"}
    assert "mmap threshold" not in format_table(result)
    result["spec"]["child_env"] = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=0x20000"}  # hex: 128 KiB
    assert "time: with glibc's mmap threshold lowered" in format_table(result)


def test_bench_reports_child_failure(toys_importable):
    with pytest.raises(BenchError, match="(?s)variant 'end-to-end' failed .*RuntimeError: mat1 and mat2"):
        # a 5-wide input into an 8-input model fails inside the child; its error comes back
        run_bench("toys:ResidualMLP", input_shape=[5], batch=2, steps=1, warmup=0, rounds=1,
                  variants=["end-to-end"], progress=False)


def test_bench_lockstep_steps_each_variant_in_its_own_process_in_turn(toys_importable):
    variants = ["end-to-end", "freeze", "replace"]
    result = run_bench("toys:ResidualMLP", input_shape=[8], batch=16, steps=6, warmup=1, rounds=1, threads=1,
                       variants=variants, sets={"depth": 6}, lockstep=True, progress=False)
    assert result["paired_mode"] == "lockstep" and result["paired_orders"] == []
    pids = result["lockstep_pids"]
    assert sorted(pids) == sorted(variants) and len(set(pids.values())) == 3 and os.getpid() not in pids.values()
    rows = {r["variant"]: r for r in result["variants"]}
    for name in variants:
        times = result["paired"][name]
        assert len(times["step_ms"]) == len(times["cpu_ms"]) == 6  # steps x rounds, each in its process
        assert all(t > 0 for t in times["step_ms"])
        ratios = [a / b for a, b in zip(times["step_ms"], result["paired"]["freeze"]["step_ms"])]
        assert rows[name]["vs_freeze"]["paired"] == pytest.approx(statistics.median(ratios))
        assert rows[name]["vs_freeze"]["paired_ci"] is not None  # 6 steps: the smallest count with a 95% interval
    assert "paired steps: lockstep, one process per variant" in format_table(result)
    assert len(result["loadavg"]) == len(variants) + 1  # the fresh processes, then the lockstep group


def test_bench_lockstep_reports_a_failing_or_stuck_child(toys_importable, tmp_path, monkeypatch):
    # a step that fails inside a lockstep child: its error comes back, the other children are ended
    with pytest.raises(BenchError, match="(?s)variant 'freeze' failed in its lockstep process .*RuntimeError: "
                                         "mat1 and mat2"):
        lockstep_times(dict(_spec(), input_shape=[5]), ["freeze", "replace"], steps=1, timeout=120)
    # a step that does not end: killed at the timeout, and said so
    (tmp_path / "sleepy.py").write_text(
        "import time, torch\n"
        "class Sleepy(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(8, 2)\n"
        "    def forward(self, x):\n"
        "        if self.training and torch.is_grad_enabled(): time.sleep(60)\n"
        "        return self.fc(x)\n"
        "def make():\n"
        "    return Sleepy()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]]))
    with pytest.raises(BenchError, match="variant 'end-to-end' took longer than 10 s in its lockstep process"):
        lockstep_times(dict(_spec(), model="sleepy:make"), ["end-to-end"], steps=1, timeout=10)


def _spec():
    return {"model": "toys:ResidualMLP", "size": 8, "batch": 2, "input_shape": [8], "num_classes": 4,
            "sets": {}, "every": None, "pattern": None, "sample": 0.25, "steps": 1, "warmup": 0,
            "device": "cpu", "threads": 1, "dtype": "float32", "seq": 8, "compile": False, "child_env": {}}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "end-to-end,turbo"], "unknown variant\\(s\\) \\['turbo'\\]"),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--set", "depth"], "--set expects KEY=VALUE"),
        (["--input-shape", "8,x"], "--input-shape expects comma-separated integers, got '8,x'"),
        (["--sample", "2"], "--sample must be a fraction in \\(0, 1\\], got 2.0"),
        (["--child-env", "NOVALUE"], "--child-env expects KEY=VALUE, got 'NOVALUE'"),
        (["--variants", "freeze,replace,freeze"], "variant\\(s\\) \\['freeze'\\] given more than once"),
        (["--paired", "--lockstep"], "--paired and --lockstep both time the variants in turn; choose one"),
    ],
)
def test_bench_argument_errors(argv, message, capsys):
    assert main(["bench", "toys:ResidualMLP", *argv]) == 2
    err = capsys.readouterr().err
    assert "replace-wrap bench: error:" in err
    assert __import__("re").search(message, err), err


def test_build_model_errors_name_the_spec():
    with pytest.raises(BenchError, match="cannot load 'no_such_module_xyz:f'.*package.module:factory"):
        build_model("no_such_module_xyz:f", 32, 10, {})
    assert issubclass(BenchError, ReplaceWrapError)


def test_hf_decoder_specs_build_causal_lms_fed_with_tokens():
    pytest.importorskip("transformers")
    import torch

    from replace_wrap.cli.bench_child import _loss, example_input

    model = build_model("hf:gpt2", 32, 10, {"n_layer": 3, "n_embd": 16, "n_head": 2, "vocab_size": 50})
    assert type(model).__name__ == "GPT2LMHeadModel"
    x = example_input(model, {"batch": 2, "seq": 7, "input_shape": [3, 32, 32]}, "cpu")
    assert x.dtype == torch.long and x.shape == (2, 7) and int(x.max()) < 50
    assert torch.isfinite(_loss(model(x)))
    vit = build_model("hf:vit", 32, 10, {"num_hidden_layers": 3, "hidden_size": 16, "num_attention_heads": 2,
                                         "intermediate_size": 32, "patch_size": 8})
    assert example_input(vit, {"batch": 2, "seq": 7, "input_shape": [3, 32, 32]}, "cpu").shape == (2, 3, 32, 32)


def test_median_interval_is_the_order_statistic_interval_of_the_binomial():
    from scipy.stats import binom

    for n in range(1, 61):
        values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose: n, n-1, ..., 1
        # the largest k with P(X <= k - 1) <= 2.5% for X ~ Binomial(n, 1/2), by scipy's cdf
        k = max((j for j in range(1, n + 1) if binom.cdf(j - 1, n, 0.5) <= 0.025), default=0)
        got = median_interval(values)
        if k == 0:
            assert got is None, n
        else:
            assert got == [float(k), float(n + 1 - k)], n
    assert median_interval([1.0] * 5) is None and median_interval([3.0, 1.0, 2.0, 5.0, 4.0, 6.0]) == [1.0, 6.0]
    assert median_interval(list(range(20))) == [5, 14]  # P(X <= 5) = 2.07% for n = 20, P(X <= 6) = 5.77%


def test_median_interval_covers_the_median_at_least_95_percent_of_the_time():
    import random

    rng = random.Random(0)
    for n in (8, 20, 41):
        # a skewed distribution of known median: exp(N(0, 1)) has median 1
        hits = 0
        for _ in range(2000):
            lo, hi = median_interval([math.exp(rng.gauss(0.0, 1.0)) for _ in range(n)])
            hits += lo <= 1.0 <= hi
        assert hits / 2000 >= 0.94, (n, hits)  # >= 95% in expectation; 0.94 leaves the Monte Carlo error


def test_paired_order_rotates_so_each_variant_takes_each_place_equally_often():
    names = ["end-to-end", "freeze", "replace"]
    orders = [paired_order(names, step) for step in range(6)]
    assert orders[0] == names and orders[1] == ["freeze", "replace", "end-to-end"] and orders[3] == names
    for place in range(3):
        assert sorted(o[place] for o in orders) == sorted(names * 2)
    # in the sequence of all steps, replace no longer always runs right after freeze
    sequence = [name for o in orders for name in o]
    before = {sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == "replace"}
    assert before == {"freeze", "end-to-end"}
