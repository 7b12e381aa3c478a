"""The numba backend under threads (issue 11): concurrent calls from Python threads under
every threading layer, thread counts picked by the work's size, numba's thread-local
settings restored, and the passive OpenMP wait policy."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastweights

numba = pytest.importorskip("numba")

DISABLE_JIT = bool(getattr(numba.config, "DISABLE_JIT", False))
needs_jit = pytest.mark.skipif(DISABLE_JIT, reason="no threading layer with NUMBA_DISABLE_JIT")

_CONCURRENT = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    try:
        from numba.np.ufunc.parallel import _launch_threads
        _launch_threads()
    except (ImportError, ValueError) as exc:
        print("UNAVAILABLE", exc)
        sys.exit(0)
    import numba
    import fastweights as fw
    from fastweights.testing import random_call

    calls = [random_call(op, seed=i, batch=2, length=300, key_dim=16, value_dim=70)
             for i, op in enumerate(["gated_delta_rule", "kda", "simple_gla", "linear_attn"])]
    step = random_call("gated_delta_rule", seed=9, batch=3, length=1, key_dim=16, value_dim=70)

    def prefill(call, form):
        return call.run(getattr(fw, call.op), backend="numba", form=form,
                        output_final_state=True)

    def decode():
        pool = np.array(step.arrays["initial_state"])
        a = step.arrays
        o, _ = fw.step.gated_delta_rule(a["q"][:, 0], a["k"][:, 0], a["v"][:, 0],
                                        a["g"][:, 0], a["beta"][:, 0], pool, backend="numba")
        return o, pool

    jobs = [lambda c=c, f=f: prefill(c, f) for c in calls for f in ("recurrent", "chunk")]
    jobs.append(decode)
    want = [job() for job in jobs]  # one thread
    errors = []

    def worker(i):
        for r in range(6):
            j = (i + r) % len(jobs)
            got = jobs[j]()
            for g, w in zip(got, want[j]):
                if not np.array_equal(g, w):
                    errors.append((i, j))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("LAYER", numba.threading_layer(), "ERRORS", len(errors))
    """
)


@needs_jit
@pytest.mark.slow
@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_concurrent_calls_from_eight_threads(layer: str) -> None:
    """8 Python threads call sequence ops (both forms) and decoding steps at once: no abort
    (the workqueue layer aborted the process) and every result equals the one-thread one."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer, "NUMBA_NUM_THREADS": "2"}
    res = subprocess.run(
        [sys.executable, "-c", _CONCURRENT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if "UNAVAILABLE" in res.stdout:
        pytest.skip(f"threading layer {layer} is not available: {res.stdout.strip()}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"LAYER {layer} ERRORS 0" in res.stdout, res.stdout + res.stderr[-3000:]


def _threads_at_launch(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record numba's thread count at every kernel launch of the numba backend."""
    from fastweights.backends.numba import _driver

    seen: list[int] = []
    real = _driver.call_kernel

    def spy(*args: object) -> object:
        seen.append(int(numba.get_num_threads()))
        return real(*args)

    monkeypatch.setattr(_driver, "call_kernel", spy)
    return seen


@needs_jit
def test_small_work_runs_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A B=1 decoding step (H=16, K=V=128) opens no parallel region across threads (it ran on
    every thread, 16 ms instead of 0.12 ms on a busy machine); a long prefill uses them all."""
    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread")
    seen = _threads_at_launch(monkeypatch)
    rng = np.random.default_rng(0)
    N, H, K, V = 1, 16, 128, 128
    pool = np.zeros((N, H, K, V), np.float32)
    q, k = rng.standard_normal((2, N, H, K), dtype=np.float32)
    v = rng.standard_normal((N, H, V), dtype=np.float32)
    g = np.full((N, H), -0.1, np.float32)
    beta = np.full((N, H), 0.5, np.float32)
    fastweights.step.gated_delta_rule(q, k, v, g, beta, pool, backend="numba")
    assert seen == [1]
    T = 256
    qs, ks = rng.standard_normal((2, 1, T, 4, K), dtype=np.float32)
    vs = rng.standard_normal((1, T, 4, V), dtype=np.float32)
    gs = np.full((1, T, 4), -0.1, np.float32)
    fastweights.simple_gla(qs, ks, vs, gs, backend="numba", form="recurrent")
    assert seen[1] == numba.get_num_threads()


@needs_jit
def test_thread_local_settings_restored() -> None:
    """A call restores the caller's numba thread count and parallel chunk size, and another
    thread's settings are its own while calls run concurrently."""
    from fastweights.testing import random_call

    call = random_call("gated_delta_rule", seed=0, batch=2, length=40)
    n = numba.get_num_threads()
    old_chunk = numba.get_parallel_chunksize()
    other: list[tuple[int, int]] = []
    go = threading.Event()

    def worker() -> None:
        numba.set_parallel_chunksize(7)
        go.set()
        for _ in range(20):
            call.run(fastweights.gated_delta_rule, backend="numba", form="recurrent")
            other.append((numba.get_parallel_chunksize(), numba.get_num_threads()))

    t = threading.Thread(target=worker)
    t.start()
    go.wait()
    for _ in range(20):
        call.run(fastweights.gated_delta_rule, backend="numba", form="chunk")
    t.join()
    assert numba.get_num_threads() == n
    assert numba.get_parallel_chunksize() == old_chunk
    assert set(other) == {(7, n)}


_POLICY = "import os, fastweights.backends.numba._layout; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, "PASSIVE"),
        ({"OMP_WAIT_POLICY": "active"}, "active"),
        ({"GOMP_SPINCOUNT": "1000"}, None),
    ],
)
@pytest.mark.slow
def test_passive_wait_policy_unless_the_user_chose(env: dict[str, str], want: str | None) -> None:
    """Idle OpenMP workers sleep by default (spinning ones collapsed a busy machine); a
    policy the user set, or a spin count, is left alone."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    res = subprocess.run(
        [sys.executable, "-c", _POLICY],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert res.stdout.strip() == str(want)


def test_info_shows_threading_layer_threads_and_wait_policy() -> None:
    from fastweights._cli_info import run_info

    out = io.StringIO()
    run_info(out)
    text = out.getvalue()
    for label in ("threading layer", "threads", "wait policy", "BLAS threads"):
        assert f"\n  {label}" in text
