"""fastweights beside other fastweights processes, as the workers of a server run it.

The benchmark starts the other processes itself: each runs numba prefills (B=1, T=2048, H=4,
K=V=128, ``gated_delta_rule``, float32) for a bounded time, then exits.

- ``track_step_busy_us`` / ``track_step_quiet_us``: the mean B=1 decoding step (H=16,
  K=V=128, numba) beside two such processes, and alone (targets: at most 1000 us and at most 3x
  the quiet mean);
- ``track_two_processes_work``: prefills per second of two processes together over one alone
  (target: at least 0.9; 1.0 means no work is lost to contention).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import numpy as np

import fastweights
from fastweights._bench import backend_namespace

from ._quick import SMOKE

WORKER = """
import sys, time
from fastweights._bench import make_inputs, run_op
seconds = float(sys.argv[1])
args, kwargs = make_inputs("gated_delta_rule", 1, int(sys.argv[2]), 4, 128, 128)
run_op("gated_delta_rule", args, kwargs, backend="numba")
print("ready", flush=True)
sys.stdin.readline()
count, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    run_op("gated_delta_rule", args, kwargs, backend="numba")
    count += 1
print(count / (time.perf_counter() - start), flush=True)
"""
PREFILL_T = 512 if SMOKE else 2048
SECONDS = 0.5 if SMOKE else 6.0
STEPS = 100 if SMOKE else 3000


class _Workers:
    """``n`` prefill processes, started, released together, and collected or stopped."""

    def __init__(self, n: int, seconds: float) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(seconds), str(PREFILL_T)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
        for p in self.procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                self.stop()
                raise RuntimeError("a worker process failed to start")

    def go(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

    def rates(self) -> list[float]:
        out = []
        for p in self.procs:
            assert p.stdout is not None
            out.append(float(p.stdout.readline()))
            p.wait(timeout=60)
        return out

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(timeout=60)


class BusyMachine:
    timeout = 300

    def setup(self) -> None:
        backend_namespace("numba", "gated_delta_rule", step=True)
        rng = np.random.default_rng(0)
        N, H, D = 1, 16, 128
        k = rng.standard_normal((N, H, D), dtype=np.float32)
        self.args = (
            rng.standard_normal((N, H, D), dtype=np.float32),
            k / np.linalg.norm(k, axis=-1, keepdims=True),
            rng.standard_normal((N, H, D), dtype=np.float32),
            np.full((N, H), -0.05, dtype=np.float32),
            np.full((N, H), 0.5, dtype=np.float32),
        )
        self.pool = np.zeros((N, H, D, D), dtype=np.float32)
        self.mean_step()

    def mean_step(self) -> float:
        """Mean seconds of one decoding step over ``STEPS`` steps (at most 10 s)."""
        step = fastweights.step.gated_delta_rule
        done, start = 0, time.perf_counter()
        while done < STEPS and time.perf_counter() - start < 10:
            step(*self.args, self.pool, backend="numba")
            done += 1
        return (time.perf_counter() - start) / done

    def _busy_step(self) -> float:
        workers = _Workers(2, seconds=60)
        try:
            workers.go()
            time.sleep(0.5)
            return self.mean_step()
        finally:
            workers.stop()

    def track_step_quiet_us(self) -> float:
        time.sleep(0.3)
        return self.mean_step() * 1e6

    track_step_quiet_us.unit = "us"  # type: ignore[attr-defined]

    def track_step_busy_us(self) -> float:
        return self._busy_step() * 1e6

    track_step_busy_us.unit = "us"  # type: ignore[attr-defined]

    def track_step_busy_over_quiet(self) -> float:
        ratios = []
        for _ in range(1 if SMOKE else 3):
            time.sleep(0.3)
            quiet = self.mean_step()
            ratios.append(self._busy_step() / quiet)
        return statistics.median(ratios)

    track_step_busy_over_quiet.unit = "busy step / quiet step"  # type: ignore[attr-defined]

    def track_two_processes_work(self) -> float:
        one = _Workers(1, SECONDS)
        one.go()
        alone = one.rates()[0]
        two = _Workers(2, SECONDS)
        two.go()
        return sum(two.rates()) / alone

    track_two_processes_work.unit = "work of two / work of one"  # type: ignore[attr-defined]
