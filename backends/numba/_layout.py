"""From a validated call to the kernels' arguments, and the kernels' dispatch.

The kernels read the caller's arrays in place (any strides) in the compute dtype; only float16
inputs, mixed dtypes and ``linear_attn(normalize=True)`` (its normaliser is one more value
column of ones) cost a copy. Every kernel is compiled for arrays of layout ``'A'`` (any
strides; the last axis must be contiguous, other inputs are copied), so contiguous and strided
inputs share one compiled version per dtype.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import typeof

from fastweights.backends import Call

from ._blas import RELEASE_ENV, blas_libraries, release_blas_threads
from ._blas import policy as blas_release_policy
from ._jit import DISABLE_JIT, compiling
from ._passes import VB

_lock = threading.Lock()


def _passive_wait_policy() -> None:
    """Let idle OpenMP workers sleep instead of spinning, unless the user chose otherwise.

    libgomp's default spin-wait makes its idle workers compete for the cores with other
    processes and with the next parallel region's own threads (a collapse on a busy machine).
    libgomp reads these variables once, when numba's ``omp`` layer loads it: this runs before
    the first kernel launch (a process that started numba's threads earlier keeps its policy).
    """
    global _policy_set_here
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _policy_set_here = True


_policy_set_here = False
_passive_wait_policy()


def _any_layout(value: Any) -> Any:
    ty = typeof(value)
    if isinstance(value, np.ndarray):
        return ty.copy(layout="A", readonly=False)
    return ty


def _key(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return (value.dtype.num, value.ndim)
    return type(value)


_entry_points: dict[tuple[Any, ...], Any] = {}


def call_kernel(dispatcher: Any, *args: Any) -> Any:
    """Call a jitted kernel through its ``'A'``-layout version, compiling it on first use.

    The compiled entry point is looked up by the arguments' dtypes and ranks and called
    directly: numba's dispatcher would compile one version per memory layout and spend
    about 200 microseconds typing 26 arguments, more than a small decoding step takes.
    A first compilation (not found in the kernel cache) is logged, see :func:`._jit.compiling`.
    """
    if DISABLE_JIT:
        return dispatcher(*args)
    key = (id(dispatcher), *(_key(a) for a in args))
    entry = _entry_points.get(key)
    if entry is None:
        sig = tuple(_any_layout(a) for a in args)
        with _lock:
            if sig not in dispatcher.overloads:
                with compiling(dispatcher, sig):
                    dispatcher.compile(sig)
            entry = _entry_points[key] = dispatcher.overloads[sig].entry_point
    return entry(*args)


def num_threads() -> int:
    """The calling thread's numba thread count (``numba.set_num_threads``): the most a kernel
    launch uses."""
    if DISABLE_JIT:
        return 1
    from numba import get_num_threads

    return int(get_num_threads())


MIN_WORK_PER_THREAD = 1 << 20
"""State-element updates (about 0.3-1 ms of one core) below which a thread costs more to wake
and join than it saves: a B=1 decoding step (H=16, K=V=128: 262144) runs on one thread."""


def threads_for(work: int, parallel_tasks: int) -> int:
    """Threads for a kernel launch of ``work`` state-element updates split in ``parallel_tasks``.

    At most :func:`num_threads`, one per task, one per :data:`MIN_WORK_PER_THREAD` updates.

    Examples
    --------
    >>> from fastweights.backends.numba._layout import threads_for
    >>> threads_for(16 * 128 * 128, 32)  # one decoding step of 16 heads
    1
    """
    most = min(parallel_tasks, work // MIN_WORK_PER_THREAD)
    return 1 if most <= 1 else max(1, min(num_threads(), most))


_serial = threading.Lock()
_unsafe_layer: list[bool] = []


def _layer_is_unsafe() -> bool:
    """Whether numba's active threading layer breaks under concurrent launches (workqueue)."""
    if not _unsafe_layer:
        from numba import threading_layer
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()
        _unsafe_layer.append(threading_layer() == "workqueue")
    return _unsafe_layer[0]


class launch:
    """Run a kernel launch on ``threads`` threads, ``prange`` handing out one task at a time.

    Both settings are numba's thread-local ones, restored afterwards, so concurrent callers do
    not see each other's. Under the ``workqueue`` layer, which aborts the process when two
    threads launch at once, launches are serialised; ``omp`` and ``tbb`` run them concurrently.
    A launch on more than one thread first stops OpenBLAS's spinning workers (see ``_blas``).
    A class rather than a generator: it runs on every decoding step (about 3 us, not 25).
    """

    __slots__ = ("_chunk", "_guard", "_old", "_threads")
    _api: tuple[Any, ...] = ()

    def __init__(self, threads: int) -> None:
        self._threads = threads

    def __enter__(self) -> None:
        if DISABLE_JIT:
            return
        if self._threads > 1:
            release_blas_threads()
        if not launch._api:
            from numba.np.ufunc import parallel

            _layer_is_unsafe()
            # numba's thread-local setters without the public wrappers' checks (set by
            # _launch_threads; the public functions call these).
            names = ("num_threads", "num_threads", "parallel_chunksize", "parallel_chunksize")
            launch._api = tuple(
                vars(parallel)[f"_{op}_{name}"]
                for op, name in zip(("get", "set", "get", "set"), names, strict=True)
            )
        get_n, set_n, get_c, set_c = launch._api
        self._guard = _serial if _unsafe_layer[0] else None
        if self._guard is not None:
            self._guard.acquire()
        self._old = get_n()
        n = max(1, min(self._threads, self._old))
        if n != self._old:
            set_n(n)
        self._chunk = -1  # one thread: the chunk size does not matter
        if n > 1:
            self._chunk = get_c()
            set_c(1)

    def __exit__(self, *exc: object) -> None:
        if DISABLE_JIT:
            return
        get_n, set_n, _, set_c = launch._api
        if self._chunk >= 0:
            set_c(self._chunk)
        if get_n() != self._old:
            set_n(self._old)
        if self._guard is not None:
            self._guard.release()


def threading_info() -> dict[str, str]:
    """numba's threading layer, thread count and the OpenMP wait policy, for ``info``.

    Starts numba's threads (after :func:`_passive_wait_policy`, as a first kernel would).
    """
    from numba import config, get_num_threads

    layer = "unavailable"
    try:
        _layer_is_unsafe()
        from numba import threading_layer

        layer = str(threading_layer())
    except (ImportError, ValueError) as exc:  # no usable layer
        layer = f"unavailable ({exc})".splitlines()[0]
    policy = os.environ.get("OMP_WAIT_POLICY")
    spin = os.environ.get("GOMP_SPINCOUNT")
    if _policy_set_here:
        wait = "passive (OMP_WAIT_POLICY=PASSIVE set by fastweights; set it to override)"
    elif policy is not None or spin is not None:
        parts = [f"OMP_WAIT_POLICY={policy}" if policy is not None else "", ""]
        parts[1] = f"GOMP_SPINCOUNT={spin}" if spin is not None else ""
        wait = "set by the user: " + " ".join(p for p in parts if p)
    else:
        wait = "OpenMP default"
    if layer != "omp" and not layer.startswith("unavailable"):
        wait += " (applies to the omp layer only)"
    info = {
        "threading layer": layer,
        "threads": f"{get_num_threads()} (NUMBA_NUM_THREADS="
        f"{getattr(config, 'NUMBA_NUM_THREADS', '?')}); "
        f"fewer for small calls, one per {MIN_WORK_PER_THREAD} state updates",
        "wait policy": wait,
    }
    try:
        release = blas_release_policy()
    except ValueError as exc:
        return {**info, "BLAS threads": str(exc)}
    what = {
        "auto": "stopped before a multi-threaded kernel while no other Python thread runs",
        "always": "stopped before every multi-threaded kernel",
        "never": "left spinning",
    }[release]
    pools = blas_libraries()
    found = f"{pools} OpenBLAS pthreads pool{'' if pools == 1 else 's'} found"
    return {
        **info,
        "BLAS threads": f"{RELEASE_ENV}={release}: OpenBLAS's idle workers {what} ({found})",
    }


_DUMMY: dict[Any, np.ndarray] = {}


def dummy(dtype: Any, ndim: int = 4) -> np.ndarray:
    """A one-element stand-in for an absent array argument (keeps one kernel signature)."""
    key = (np.dtype(dtype), ndim)
    if key not in _DUMMY:
        _DUMMY[key] = np.zeros((1,) * ndim, dtype=dtype)
    return _DUMMY[key]


@dataclass
class Args:
    """The recurrent kernel's inputs for one call, in the compute dtype."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    gate: np.ndarray
    beta: np.ndarray
    gate_kind: int
    beta_per_value: bool
    erase: bool
    n_sub: int
    G: int
    l2norm: bool
    scale: float
    V: int
    """Value columns the kernel sees (``V + 1`` with the normaliser of linear attention)."""


def unit_last(x: np.ndarray) -> bool:
    """Whether the last axis is contiguous (what :func:`._jit.row` needs)."""
    return x.shape[-1] <= 1 or x.strides[-1] == x.itemsize


def as_rows(x: Any, dt: Any) -> np.ndarray:
    """``x`` in dtype ``dt`` with a contiguous last axis; a view when it already is."""
    x = np.asarray(x, dtype=dt)
    return x if unit_last(x) else np.ascontiguousarray(x)


_as = as_rows


def kernel_args(call: Call) -> Args:
    """Inputs of ``call`` as the kernels take them: compute dtype, caller's layout."""
    dt = np.dtype(call.dtype)
    q, k, v = _as(call.q, dt), _as(call.k, dt), _as(call.v, dt)
    if call.normalize:
        ones = np.ones((*v.shape[:-1], 1), dtype=dt)
        v = np.ascontiguousarray(np.concatenate([v, ones], axis=-1))
    gate_kind = 0
    gate = dummy(dt)
    if call.gk is not None:
        gate_kind, gate = 2, _as(call.gk, dt)
    elif call.g is not None:
        gate_kind, gate = 1, _as(call.g, dt)[..., None]
    beta = dummy(dt)
    if call.beta is not None:
        beta = _as(call.beta, dt)
        if beta.ndim == 3:
            beta = beta[..., None]
    return Args(
        q=q,
        k=k,
        v=v,
        gate=gate,
        beta=beta,
        gate_kind=gate_kind,
        beta_per_value=call.beta_per_value,
        erase=call.spec.erase,
        n_sub=call.num_householder,
        G=call.HV // call.H,
        l2norm=call.use_qk_l2norm,
        scale=float(call.scale),
        V=int(v.shape[3]),
    )


def sequences(call: Call) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(batch row, first token, end token)`` of every sequence, as int64 arrays."""
    if call.cu_seqlens is None:
        rows = np.arange(call.B, dtype=np.int64)
        return rows, np.zeros(call.B, np.int64), np.full(call.B, call.T, np.int64)
    cu = call.cu_seqlens
    return np.zeros(cu.shape[0] - 1, np.int64), cu[:-1].copy(), cu[1:].copy()


@functools.lru_cache(maxsize=64)
def uniform_tasks(
    N: int, T: int, HV: int, V: int, threads: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`tasks` for ``N`` sequences of ``T`` tokens (cached: decoding calls repeat)."""
    out = tasks(np.full(N, T, np.int64), HV, V, threads)
    for x in out:
        x.flags.writeable = False
    return out


def tasks(
    lengths: np.ndarray, HV: int, V: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split the work into (sequence, value head, value blocks) tasks, longest first.

    A task walks its sequence once for all its value blocks (it prepares the per-step vectors
    once); value blocks are split over more tasks only when there are too few (sequence, head)
    pairs to keep every thread busy.
    """
    nvb = -(-V // VB)
    pairs = int(lengths.shape[0]) * HV
    want = 2 * (num_threads() if threads is None else threads)
    groups = 1 if pairs >= want else min(nvb, -(-want // max(pairs, 1)))
    bounds = np.linspace(0, nvb, groups + 1).round().astype(np.int64)
    seq = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), HV * groups)
    hv = np.tile(np.repeat(np.arange(HV, dtype=np.int64), groups), lengths.shape[0])
    g = np.tile(np.arange(groups, dtype=np.int64), lengths.shape[0] * HV)
    order = np.argsort(-lengths[seq], kind="stable")
    return seq[order], hv[order], bounds[g][order], bounds[g + 1][order]
