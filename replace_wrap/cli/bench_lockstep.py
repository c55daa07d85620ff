"""``replace-wrap bench --lockstep``: every training variant in a process of its own, one step of each in turn.

``--paired`` times the variants a step of each in turn inside processes that hold every variant. They then
share one heap, and each variant's step meets the allocator as the other's step left it: under glibc's
defaults the replaced Llama of docs/benchmarks.md faulted 76.8 k pages a step beside the frozen one and 65.5 k
alone, where the frozen one faulted 32.8 k beside it and 65.5 k alone (``examples/bench_faults.py``). Where a model
sits in such a process moves its step time too (two identical freeze models read 1.011x and 0.997x by which
was built first). Here each variant is built and warmed up in its own interpreter, one after the other; then
the parent steps them in turn, the order rotated by one each step (:func:`~.bench_child.paired_order`). Only one
process computes at a time (the others wait on a pipe read), so the variants share every moment of the
machine's load, as paired ones do, and nothing else: each keeps its own heap, caches aside.

Protocol: the child reads its spec as the first line of stdin (JSON), builds, warms up and prints ``READY <pid>``;
then for each ``step`` line it runs one training step and prints ``TIME <wall ms> <cpu ms>``; it exits at end of
input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from typing import Any

from .bench_child import BenchError, paired_order, train_steps, warmed_up

__all__ = ["lockstep_times"]


def lockstep_times(
    spec: dict[str, Any], names: list[str], steps: int, timeout: float
) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """``steps`` training steps of each variant in ``names``, each in its own process, stepped in turn.

    Returns:
        Per variant ``{"step_ms": [...], "cpu_ms": [...]}``, where position ``i`` of every list is lockstep step
        ``i`` (the shape of ``run_bench``'s paired steps); and per variant the process id that stepped it.

    Raises:
        BenchError: When a child fails or does not answer within ``timeout`` seconds (build and warm-up, or one
            step), with the end of its stderr.
    """
    children: dict[str, _Child] = {}
    try:
        pids = {}
        for name in names:  # built one after the other: no two builds or warm-ups compete for the cores
            children[name] = _Child(dict(spec, variant=name), timeout)
            pids[name] = int(children[name].expect("READY")[0])
        times: dict[str, dict[str, list[float]]] = {name: {"step_ms": [], "cpu_ms": []} for name in names}
        for step in range(steps):
            for name in paired_order(list(names), step):
                wall, cpu = children[name].step()
                times[name]["step_ms"].append(wall)
                times[name]["cpu_ms"].append(cpu)
        return times, pids
    finally:
        for child in children.values():
            child.close()


class _Child:
    """One variant's process, answering a line at a time; killed (and reported) past ``timeout`` seconds."""

    def __init__(self, spec: dict[str, Any], timeout: float) -> None:
        self.name, self.timeout = spec["variant"], timeout
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up with warnings and block the child
        env = dict(os.environ, **spec.get("child_env", {}))
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1, env=env)
        self._send(json.dumps(spec))

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            self.fail("exited")

    def expect(self, word: str) -> list[str]:
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            self.proc.kill()

        timer = threading.Timer(self.timeout, kill)
        timer.start()
        try:  # a library may print to stdout too: its lines are skipped
            parts: list[str] = []
            while not parts or parts[0] != word:
                line = self.proc.stdout.readline()  # type: ignore[union-attr]
                if not line:  # end of output: the child exited (or was killed)
                    break
                parts = line.split()
        finally:
            timer.cancel()
        if not parts or parts[0] != word:
            self.fail(f"took longer than {self.timeout:.0f} s" if expired.is_set() else "failed")
        return parts[1:]

    def step(self) -> tuple[float, float]:
        self._send("step")
        wall, cpu = self.expect("TIME")
        return float(wall), float(cpu)

    def fail(self, what: str) -> None:
        self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        tail = "\n".join(self.stderr.read().strip().splitlines()[-15:])
        raise BenchError(f"variant {self.name!r} {what} in its lockstep process (exit {self.proc.returncode}):\n{tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.stderr.close()


def _serve() -> int:
    import torch

    spec = json.loads(sys.stdin.readline())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model, x, opt = warmed_up(spec, spec["variant"])
    print(f"READY {os.getpid()}", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        ((wall, cpu),) = train_steps(model, x, spec, 1, opt)
        print(f"TIME {wall!r} {cpu!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
