"""Kernels of :mod:`fastweights.layers` for NumPy arrays: the short causal convolution, its
decoding step and the gates.

Arguments arrive validated by :mod:`fastweights.layers`; here they are brought to the compute
dtype with a contiguous last axis (:func:`._layout.as_rows`: a view when they already are) and
each kernel runs in parallel over rows:

- :func:`conv_kernel`: tasks of up to :data:`TOKENS_PER_TASK` tokens of one sequence; a token's
  output reads ``W`` input rows (from the sequence, or from the initial state before its
  start) and is accumulated over the channels, which vectorise.
- :func:`final_state_kernel`: one task per sequence, its last ``W - 1`` inputs.
- :func:`step_kernel`: one task per batch row, reading and shifting its row of the pool (any
  strides, float32 or float64, whatever the compute dtype).
- :func:`gate_kernel`: tasks of whole rows ``[H, K]``, about :data:`GATE_TASK` elements,
  computed in float64 through the vector ``exp`` of :mod:`._math` and a series for
  ``log1p`` of ``(0, 1]`` (LLVM vectorises neither ``math.exp`` nor ``math.log1p``).

The SiLU of the convolution goes through the same ``exp``. Launches of little work stay on
one thread (:data:`MIN_WORK`).

Every index is in range by construction for every shape the validation accepts (empty
sequences, ``W = 1``, ``D = 0`` and zero-size batches included); the checked build
(``FASTWEIGHTS_NUMBA_CHECKED=1``) verifies it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from ._jit import jit, row
from ._layout import as_rows, call_kernel, dummy, launch, threads_for
from ._math import exp_f64

Array = Any

TOKENS_PER_TASK = 64
"""Tokens of one sequence per task of :func:`conv_kernel`."""


@jit(inline=True)
def _log1p_unit(e: float) -> float:
    """``log1p(e)`` for ``0 <= e <= 1`` in float64, in vector code: ``2 atanh(s)`` with ``s = e
    / (2 + e) <= 1/3``, its series to ``s^33`` (the next term is below ``2e-18`` relative)."""
    s = e / (2.0 + e)
    s2 = s * s
    p = 1.0 / 33.0
    p = p * s2 + 1.0 / 31.0
    p = p * s2 + 1.0 / 29.0
    p = p * s2 + 1.0 / 27.0
    p = p * s2 + 1.0 / 25.0
    p = p * s2 + 1.0 / 23.0
    p = p * s2 + 1.0 / 21.0
    p = p * s2 + 1.0 / 19.0
    p = p * s2 + 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0 / 1.0
    return 2.0 * s * p


@jit(inline=True)
def _silu_row(yr: Any, n: int, t: Array, e: Array, red: Array) -> None:
    """``yr[:n] = z sigmoid(z)`` through the vector ``exp`` of :mod:`._math` (float64
    scratch ``t, e, red`` of ``n`` elements): ``sigmoid(z) = 1 / (1 + exp(-z))`` for ``z >=
    0``, ``exp(z) / (1 + exp(z))`` below, so ``exp`` never overflows."""
    for d in range(n):
        t[d] = -abs(np.float64(yr[d]))
    exp_f64(t, e, e.view(np.int64), red)
    for d in range(n):
        z = np.float64(yr[d])
        inv = 1.0 / (1.0 + e[d])
        yr[d] = z * (inv if z >= 0.0 else e[d] * inv)


@jit(parallel=True)
def conv_kernel(
    x: Array,
    w: Array,
    bias: Array,
    state: Array,
    seq_b: Array,
    seq_s: Array,
    task_n: Array,
    task_t0: Array,
    task_t1: Array,
    has_bias: bool,
    has_state: bool,
    silu: bool,
    y: Array,
) -> None:
    """``y [1, B, T, D]`` from ``x [1, B, T, D]``, ``w [1, 1, W, D]`` (the weight transposed),
    ``bias [1, 1, 1, D]``, ``state [1, N, W-1, D]`` (the initial states transposed); sequence
    ``n`` is rows ``seq_s[n]:...`` of batch row ``seq_b[n]``, task ``i`` its tokens
    ``task_t0[i]:task_t1[i]``."""
    W = w.shape[2]
    D = y.shape[3]
    for task in prange(task_n.shape[0]):
        n = task_n[task]
        b = seq_b[n]
        s0 = seq_s[n]
        scratch = np.empty((3, D if silu else 0))
        for t in range(task_t0[task], task_t1[task]):
            yr = row(y, 0, b, t, 0)
            if has_bias:
                br = row(bias, 0, 0, 0, 0)
                for d in range(D):
                    yr[d] = br[d]
            else:
                for d in range(D):
                    yr[d] = 0.0
            for j in range(W):
                src = t - (W - 1) + j
                wr = row(w, 0, 0, j, 0)
                if src >= s0:
                    xr = row(x, 0, b, src, 0)
                    for d in range(D):
                        yr[d] += wr[d] * xr[d]
                elif has_state:
                    sr = row(state, 0, n, src - s0 + W - 1, 0)
                    for d in range(D):
                        yr[d] += wr[d] * sr[d]
            if silu:
                _silu_row(yr, D, scratch[0], scratch[1], scratch[2])


@jit(parallel=True)
def final_state_kernel(
    x: Array,
    state: Array,
    seq_b: Array,
    seq_s: Array,
    seq_e: Array,
    has_state: bool,
    final: Array,
) -> None:
    """``final [N, D, W-1]``: the last ``W - 1`` inputs of each sequence, oldest first,
    reaching into its initial state ``state [1, N, W-1, D]`` when the sequence is shorter."""
    N, D, M = final.shape
    for n in prange(N):
        b = seq_b[n]
        s0 = seq_s[n]
        for p in range(M):
            src = seq_e[n] - M + p
            if src >= s0:
                xr = row(x, 0, b, src, 0)
                for d in range(D):
                    final[n, d, p] = xr[d]
            elif has_state:
                sr = row(state, 0, n, src - s0 + M, 0)
                for d in range(D):
                    final[n, d, p] = sr[d]
            else:
                for d in range(D):
                    final[n, d, p] = 0.0


@jit(parallel=True)
def step_kernel(
    x: Array,
    w: Array,
    bias: Array,
    pool: Array,
    rows: Array,
    has_bias: bool,
    silu: bool,
    y: Array,
) -> None:
    """One token per batch row: ``y [1, 1, N, D]`` from ``x [1, 1, N, D]``, ``w [1, 1, W, D]``
    and the pool's row ``pool[rows[i]]`` (``[P, D, W-1]``, updated in place), summed in the
    order of :func:`conv_kernel`."""
    W = w.shape[2]
    D = y.shape[3]
    for i in prange(rows.shape[0]):
        p = rows[i]
        scratch = np.empty((3, D if silu else 0))
        yr = row(y, 0, 0, i, 0)
        xr = row(x, 0, 0, i, 0)
        if has_bias:
            br = row(bias, 0, 0, 0, 0)
            for d in range(D):
                yr[d] = br[d]
        else:
            for d in range(D):
                yr[d] = 0.0
        for j in range(W - 1):
            wr = row(w, 0, 0, j, 0)
            for d in range(D):
                yr[d] += wr[d] * pool[p, d, j]
        wr = row(w, 0, 0, W - 1, 0)
        for d in range(D):
            yr[d] += wr[d] * xr[d]
        for d in range(D):
            for j in range(W - 2):
                pool[p, d, j] = pool[p, d, j + 1]
            if W > 1:
                pool[p, d, W - 2] = xr[d]
        if silu:
            _silu_row(yr, D, scratch[0], scratch[1], scratch[2])


@jit(parallel=True)
def gate_kernel(
    a: Array,
    rate: Array,
    bias: Array,
    kind: int,
    constant: float,
    rows_per_task: int,
    out: Array,
) -> None:
    """``out [1, 1, R, n]`` from ``a [1, 1, R, n]``, ``rate`` (``exp(A_log)`` of each
    element's head) and ``bias``, both ``[1, 1, 1, n]``, in float64 vector code, with ``z = a +
    bias``: ``kind`` 0 ``-rate softplus(z)`` (``softplus(z) = max(z, 0) + log1p(exp(-|z|))``),
    1 ``constant sigmoid(rate z)``, 2 ``constant sigmoid(z)``. A task's ``rows_per_task`` rows
    go through the vector ``exp`` of :mod:`._math` as one vector."""
    R, n = a.shape[2], a.shape[3]
    for task in prange((R + rows_per_task - 1) // rows_per_task):
        r0 = task * rows_per_task
        r1 = min(R, r0 + rows_per_task)
        m = (r1 - r0) * n  # the task's rows as one vector, for the exp
        u = np.empty(m)
        t = np.empty(m)
        e = np.empty(m)
        red = np.empty(m)
        rt = row(rate, 0, 0, 0, 0)
        bs = row(bias, 0, 0, 0, 0)
        for r in range(r0, r1):
            ar = row(a, 0, 0, r, 0)
            base = (r - r0) * n
            for i in range(n):
                z = np.float64(ar[i]) + bs[i]
                z = rt[i] * z if kind == 1 else z
                u[base + i] = z
                t[base + i] = -abs(z)
        exp_f64(t, e, e.view(np.int64), red)
        for r in range(r0, r1):
            orow = row(out, 0, 0, r, 0)
            base = (r - r0) * n
            if kind == 0:
                for i in range(n):
                    z = u[base + i]
                    sp = _log1p_unit(e[base + i]) + (z if z > 0.0 else 0.0)
                    orow[i] = -rt[i] * sp
            else:
                for i in range(n):
                    inv = 1.0 / (1.0 + e[base + i])
                    orow[i] = constant * (inv if u[base + i] >= 0.0 else e[base + i] * inv)


GATE_TASK = 1 << 14
"""Gate elements per task of :func:`gate_kernel` (at least one row)."""

MIN_WORK = 1 << 18
"""Multiply-adds (or gate elements) per thread below which a launch stays on one thread."""


def _threads(work: int, tasks: int) -> int:
    return threads_for(work * ((1 << 20) // MIN_WORK), tasks)


def _as4(x: np.ndarray, dt: np.dtype) -> np.ndarray:
    """``x`` (rank 3) as ``[1, ...]`` in ``dt`` with a contiguous last axis."""
    return as_rows(x, dt)[None]


def _transposed_state(state: Array | None, dt: np.dtype) -> np.ndarray:
    """An ``[N, D, W-1]`` state as the kernels read it, ``[1, N, W-1, D]`` contiguous."""
    if state is None:
        return dummy(dt)
    return np.ascontiguousarray(np.transpose(np.asarray(state, dtype=dt), (0, 2, 1)))[None]


def _weights(weight: Array, bias: Array | None, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The weight ``[D, W]`` as ``[1, 1, W, D]`` and the bias ``[D]`` as ``[1, 1, 1, D]``,
    contiguous (a one-element dummy without a bias)."""
    w = np.ascontiguousarray(np.asarray(weight, dtype=dt).T)[None, None]
    if bias is None:
        return w, dummy(dt)
    return w, np.ascontiguousarray(np.asarray(bias, dtype=dt)).reshape(1, 1, 1, -1)


def short_conv(
    x: Array,
    weight: Array,
    bias: Array | None,
    silu: bool,
    initial_state: Array | None,
    cu: np.ndarray | None,
    N: int,
    output_final_state: bool,
    dt: np.dtype,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`fastweights.layers.short_conv` on NumPy arrays (validated there)."""
    B, T, D = x.shape
    W = weight.shape[1]
    x4 = _as4(x, dt)
    w, b = _weights(weight, bias, dt)
    state = _transposed_state(initial_state, dt)
    if cu is None:
        seq_b = np.arange(B, dtype=np.int64)
        seq_s = np.zeros(B, dtype=np.int64)
        seq_e = np.full(B, T, dtype=np.int64)
    else:
        seq_b = np.zeros(N, dtype=np.int64)
        seq_s = np.ascontiguousarray(cu[:-1], dtype=np.int64)
        seq_e = np.ascontiguousarray(cu[1:], dtype=np.int64)
    chunks = (seq_e - seq_s + TOKENS_PER_TASK - 1) // TOKENS_PER_TASK
    task_n = np.repeat(np.arange(N, dtype=np.int64), chunks)
    first = np.cumsum(chunks) - chunks
    task_t0 = seq_s[task_n] + (np.arange(task_n.shape[0]) - first[task_n]) * TOKENS_PER_TASK
    task_t1 = np.minimum(task_t0 + TOKENS_PER_TASK, seq_e[task_n])
    y = np.empty((1, B, T, D), dtype=dt)
    has_state = initial_state is not None
    with launch(_threads(B * T * D * W, task_n.shape[0])):
        call_kernel(
            conv_kernel, x4, w, b, state, seq_b, seq_s, task_n, task_t0, task_t1,
            bias is not None, has_state, silu, y,
        )  # fmt: skip
    final = None
    if output_final_state:
        final = np.empty((N, D, W - 1), dtype=dt)
        with launch(_threads(N * D * W, N)):
            call_kernel(final_state_kernel, x4, state, seq_b, seq_s, seq_e, has_state, final)
    return y[0].astype(x.dtype, copy=False), final


def short_conv_step(
    x: Array,
    weight: Array,
    bias: Array | None,
    silu: bool,
    pool: np.ndarray,
    idx: np.ndarray | None,
    dt: np.dtype,
) -> np.ndarray:
    """:func:`fastweights.layers.short_conv_step` on NumPy arrays (validated there; the pool
    in native byte order)."""
    N, D = x.shape
    W = weight.shape[1]
    x4 = as_rows(x, dt)[None, None]
    w, b = _weights(weight, bias, dt)
    rows = np.arange(N, dtype=np.int64) if idx is None else np.ascontiguousarray(idx, np.int64)
    y = np.empty((1, 1, N, D), dtype=dt)
    with launch(_threads(N * D * W, N)):
        call_kernel(step_kernel, x4, w, b, pool, rows, bias is not None, silu, y)
    return y[0, 0].astype(x.dtype, copy=False)


def gate(
    kind: int,
    a: Array,
    A_log: Array | None,
    dt_bias: Array | None,
    shape: tuple[int, int, int],
    constant: float,
    dt: np.dtype,
) -> np.ndarray:
    """The gates of :mod:`fastweights.layers` (see :func:`gate_kernel`) as ``[R, H, K]``."""
    R, H, K = shape
    n = H * K
    a2 = as_rows(np.asarray(a, dtype=dt).reshape(R, n), dt)[None, None]
    if A_log is None:
        rate = np.ones((1, 1, 1, n))
    else:
        rate = np.repeat(np.exp(np.asarray(A_log, dtype=np.float64)), K).reshape(1, 1, 1, n)
    if dt_bias is None:
        bias = np.zeros((1, 1, 1, n))
    else:
        bias = np.ascontiguousarray(np.asarray(dt_bias, dtype=np.float64).reshape(1, 1, 1, n))
    out = np.empty((1, 1, R, n), dtype=dt)
    rows_per_task = max(1, GATE_TASK // max(n, 1))
    tasks = -(-R // rows_per_task)
    with launch(_threads(R * n, tasks)):
        call_kernel(gate_kernel, a2, rate, bias, kind, constant, rows_per_task, out)
    return out.reshape(shape)


__all__ = [
    "conv_kernel",
    "final_state_kernel",
    "gate",
    "gate_kernel",
    "short_conv",
    "short_conv_step",
    "step_kernel",
]
