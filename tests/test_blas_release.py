"""OpenBLAS's spinning workers are stopped before a multi-threaded numba kernel (issue 11,
item 9): the policy variable, the stop itself (the worker threads leave the process and come
back at the next matmul, with the same results), and that ``auto`` leaves BLAS alone while
another Python thread runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("threadpoolctl")

from fastweights.backends.numba import _blas, _layout


def _openblas_threads() -> int:
    from threadpoolctl import threadpool_info

    pools = [i for i in threadpool_info() if i["internal_api"] == "openblas"]
    if not pools or pools[0]["threading_layer"] != "pthreads" or pools[0]["num_threads"] < 2:
        pytest.skip("needs NumPy's OpenBLAS with a pthreads pool of two threads or more")
    return int(pools[0]["num_threads"])


def test_policy_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_blas.RELEASE_ENV, raising=False)
    assert _blas.policy() == "auto"
    monkeypatch.setenv(_blas.RELEASE_ENV, " Never ")
    assert _blas.policy() == "never"
    assert _blas.release_blas_threads() is False
    monkeypatch.setenv(_blas.RELEASE_ENV, "sometimes")
    with pytest.raises(ValueError, match=_blas.RELEASE_ENV):
        _blas.release_blas_threads()


_STOP = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from fastweights.backends.numba._blas import release_blas_threads

    def tasks():
        return len(os.listdir("/proc/self/task"))

    a = np.random.default_rng(0).standard_normal((600, 600))
    want = a @ a
    start = tasks()
    released = release_blas_threads()
    after = tasks()
    got = a @ a  # OpenBLAS starts its workers again
    print(released, start, after, tasks(), np.array_equal(got, want))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_release_stops_the_workers_and_blas_starts_them_again() -> None:
    workers = _openblas_threads() - 1
    out = subprocess.run(
        [sys.executable, "-c", _STOP], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    released, start, after, again, same = out
    assert released == "True"
    assert int(after) == int(start) - workers
    assert int(again) == int(start)
    assert same == "True"


def test_auto_leaves_blas_alone_while_another_thread_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(_blas.RELEASE_ENV, raising=False)
    calls: list[int] = []
    monkeypatch.setattr(_blas, "_shutdowns", [lambda: calls.append(1)])
    assert _blas.release_blas_threads() is (threading.active_count() == 1)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        before = len(calls)
        assert _blas.release_blas_threads() is False
        assert len(calls) == before
        monkeypatch.setenv(_blas.RELEASE_ENV, "always")
        assert _blas.release_blas_threads() is True
        assert len(calls) == before + 1
    finally:
        stop.set()
        other.join()


def test_only_launches_on_several_threads_release(monkeypatch: pytest.MonkeyPatch) -> None:
    if _layout.DISABLE_JIT:
        pytest.skip("launch does nothing with NUMBA_DISABLE_JIT")
    calls: list[int] = []
    monkeypatch.setattr(_layout, "release_blas_threads", lambda: calls.append(1))
    with _layout.launch(1):
        pass
    assert calls == []
    with _layout.launch(2):
        pass
    assert calls == [1]


def test_results_unchanged_after_a_matmul() -> None:
    import fastweights
    from fastweights.testing import random_call

    call = random_call("gated_delta_rule", seed=3, batch=4, length=700, key_dim=64, value_dim=64)
    want = call.run(fastweights.gated_delta_rule, backend="numba", output_final_state=True)
    a = np.ones((400, 400))
    for _ in range(3):
        _ = a @ a
        got = call.run(fastweights.gated_delta_rule, backend="numba", output_final_state=True)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
