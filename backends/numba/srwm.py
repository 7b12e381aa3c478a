"""The self-referential weight matrix (``srwm``, Irie et al. 2022): the recurrent form and
decoding steps.

Per (sequence, head), ``W [K, Wd]`` with ``Wd = V + 2K + 4`` (key-first: ``W^T phi`` maps
``R^K`` to ``R^Wd``) and ``phi = softmax`` over ``K``::

    [y, k, q, beta] = W_{t-1}^T phi(x_t)                 (split V, K, K, 4)
    v    = W_{t-1}^T phi(q)         vbar = W_{t-1}^T phi(k)
    d    = sigmoid(beta) (one per block of columns) * (v - vbar)
    W_t  = W_{t-1} + phi(k) d^T
    o_t  = y                                              (read with W_{t-1})

Tokens depend on each other through every column, so the work is split over (sequence, head)
only (one ``prange`` task each, longest first).

A token costs **one pass** over ``W``, kept in a local buffer (``K x Wd`` rounded up to blocks
of ``VB`` columns): the pass of token ``t`` applies the write of token ``t - 1`` and makes
every read that token ``t`` and the next one need, for each key row ``m``::

    W[m, :] += phi(k_{t-1})_m d_{t-1}
    v    += phi(q_t)_m W[m, :]      vbar += phi(k_t)_m W[m, :]      a += phi(x_{t+1})_m W[m, :]

(4 FMAs per element: the three reads and the write, the least any form does). The next token's
``W_t^T phi(x_{t+1})`` is then ``a + d_t (phi(k_t) . phi(x_{t+1}))``, without reading ``W_t``.
The first token's ``W_0^T phi(x_0)`` is read while ``W_0`` is loaded, and the last write is
stored straight into the final state. softmax is vector code (``_activations``).

A decoding step runs the same kernel with the pool as both the initial and the final state (a
task reads its own rows before it writes them; validation refuses repeated state indices).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import prange

from fastweights.backends import Call

from ._activations import LANES, sigmoid, softmax_into
from ._jit import jit, prefer_512, prefetch, row
from ._layout import as_rows, call_kernel, launch, sequences, unit_last
from ._plan import plan

VB = 32
"""Columns per block of ``W`` (a compile-time constant): ``Wd = V + 2K + 4`` is rounded up to
it (196 -> 224 at K=V=64, where blocks of 64 would give 256); the three reads and the write
keep 8 independent FMAs per row in flight even so."""

AHEAD = 4
"""Tokens ahead whose input rows a step prefetches."""

CACHE_LINE = 64

Array = Any
_pass = jit(nrt=False, noalias=True)


@_pass
def _token_pass(
    Wb: Array,
    x: int,
    D: Array,
    CA: Array,
    CQ: Array,
    CK: Array,
    CX: Array,
    AV: Array,
    AB: Array,
    AO: Array,
) -> None:
    """Block ``x``: ``W += CA d^T`` (``d = D[x]``), then ``AV = W^T CQ``, ``AB = W^T CK``,
    ``AO = W^T CX``."""
    prefer_512()
    for j in range(VB):
        AV[x, j] = 0.0
        AB[x, j] = 0.0
        AO[x, j] = 0.0
    for m in range(Wb.shape[1]):
        a = CA[m]
        cq = CQ[m]
        ck = CK[m]
        cx = CX[m]
        for j in range(VB):
            w = Wb[x, m, j] + a * D[x, j]
            Wb[x, m, j] = w
            AV[x, j] += cq * w
            AB[x, j] += ck * w
            AO[x, j] += cx * w


@_pass
def _load_pass(Wb: Array, x: int, src: Any, m: int, nv: int, c: float, AO: Array) -> None:
    """Row ``m`` of block ``x`` from ``src[:nv]`` (zeros past it), and ``AO[x] += c W[m]``."""
    for j in range(nv):
        Wb[x, m, j] = src[j]
    for j in range(nv, VB):
        Wb[x, m, j] = 0.0
    for j in range(VB):
        AO[x, j] += c * Wb[x, m, j]


@jit(nrt=False)
def _prefetch_token(x: Array, o: Array, bb: int, t: int, h: int) -> None:
    """Prefetch the rows token ``t`` reads (``x``) and writes (``o``)."""
    step = max(1, CACHE_LINE // x.itemsize)
    px = row(x, bb, t, h, 0)
    for i in range(0, x.shape[3], step):
        prefetch(px, i)
    po = row(o, bb, t, h, 0)
    for i in range(0, o.shape[3], step):
        prefetch(po, i)


@jit()
def _sweep(
    x: Array,
    W_in: Array,
    in_row: int,
    W_out: Array,
    out_row: int,
    o: Array,
    bb: int,
    t0: int,
    t1: int,
    h: int,
    write_state: bool,
) -> None:
    """One (sequence, head) from start to end."""
    dt = o.dtype
    K = x.shape[3]
    V = o.shape[3]
    Wd = W_in.shape[3]
    nb = -(-Wd // VB)
    Wp = nb * VB
    # Scratch, carved from one allocation.
    sizes = (nb * K * VB, 5 * Wp + 1, 7 * K, LANES)
    buf = np.empty(sum(sizes), dt)
    Wb = buf[: sizes[0]].reshape((nb, K, VB))
    o0 = sizes[0]
    D1 = buf[o0 : o0 + Wp]  # the write of the last token
    AV1 = buf[o0 + Wp : o0 + 2 * Wp]  # the reads W^T phi(q), W^T phi(k), W^T phi(x_next)
    AB1 = buf[o0 + 2 * Wp : o0 + 3 * Wp]
    AO1 = buf[o0 + 3 * Wp : o0 + 4 * Wp]
    OUT = buf[o0 + 4 * Wp : o0 + 5 * Wp]  # W^T phi(x) of this token
    LR = buf[o0 + 5 * Wp : o0 + 5 * Wp + 1]  # a learning rate in the compute dtype
    D = D1.reshape((nb, VB))
    AV = AV1.reshape((nb, VB))
    AB = AB1.reshape((nb, VB))
    AO = AO1.reshape((nb, VB))
    o0 += sizes[1]
    CA = buf[o0 : o0 + K]  # phi(k) of the last token
    CQ = buf[o0 + K : o0 + 2 * K]  # phi(q), phi(k) of this token
    CK = buf[o0 + 2 * K : o0 + 3 * K]
    CX = buf[o0 + 3 * K : o0 + 4 * K]  # phi(x) of the next token
    g = buf[o0 + 4 * K : o0 + 5 * K]
    red = buf[o0 + 5 * K : o0 + 6 * K]
    ZK = buf[o0 + 6 * K : o0 + 7 * K]  # zeros: softmax_into adds nothing
    o0 += sizes[2]
    M = buf[o0 : o0 + LANES]
    for i in range(K):
        CA[i] = 0.0
        ZK[i] = 0.0
    for j in range(Wp):
        D1[j] = 0.0
        AO1[j] = 0.0
    # Load W, with the first token's read W^T phi(x_0).
    if t1 > t0:
        softmax_into(row(x, bb, t0, h, 0), ZK, 0, K, CX, g, red, M)
    else:
        for i in range(K):
            CX[i] = 0.0
    for x_ in range(nb):
        j0 = x_ * VB
        nv = min(VB, Wd - j0)
        for m in range(K):
            _load_pass(Wb, x_, row(W_in, in_row, h, m, j0), m, nv, CX[m], AO)
    for j in range(Wp):
        OUT[j] = AO1[j]
    for t in range(t0, t1):
        if t + AHEAD < t1:
            _prefetch_token(x, o, bb, t + AHEAD, h)
        orow = row(o, bb, t, h, 0)
        for j in range(V):
            orow[j] = OUT[j]
        softmax_into(ZK, OUT, V, K, CK, g, red, M)  # phi(k), phi(q): 0 + OUT[V + ...]
        softmax_into(ZK, OUT, V + K, K, CQ, g, red, M)
        if t + 1 < t1:
            softmax_into(row(x, bb, t + 1, h, 0), ZK, 0, K, CX, g, red, M)
        else:
            for i in range(K):
                CX[i] = 0.0
        for x_ in range(nb):
            _token_pass(Wb, x_, D, CA, CQ, CK, CX, AV, AB, AO)
        kx = ZK[0]
        for i in range(K):
            kx += CK[i] * CX[i]
            CA[i] = CK[i]
        # d = lr (v - vbar), one learning rate per block of columns (V, K, K, 4); zero past Wd.
        c = 0
        for blk in range(4):
            LR[0] = sigmoid(OUT[V + 2 * K + blk])
            lr = LR[0]
            width = V if blk == 0 else (K if blk < 3 else 4)
            for j in range(c, c + width):
                D1[j] = lr * (AV1[j] - AB1[j])
            c += width
        for j in range(Wp):
            OUT[j] = AO1[j] + kx * D1[j]
    if not write_state:
        return
    for x_ in range(nb):
        j0 = x_ * VB
        nv = min(VB, Wd - j0)
        for m in range(K):
            dst = row(W_out, out_row, h, m, j0)
            a = CA[m]
            for j in range(nv):
                dst[j] = Wb[x_, m, j] + a * D[x_, j]


@jit(parallel=True)
def srwm_kernel(
    x: Array,
    W_in: Array,
    in_rows: Array,
    W_out: Array,
    out_rows: Array,
    o: Array,
    seq_b: Array,
    seq_t0: Array,
    seq_t1: Array,
    task_seq: Array,
    task_h: Array,
    write_state: bool,
) -> None:
    """Run every task ``(sequence, head)`` of a call, in parallel.

    Arrays are in the compute dtype, last axes contiguous: ``x [B, T, H, K]``, weights
    ``[P, H, K, Wd]`` (rows ``in_rows`` / ``out_rows`` per sequence; ``W0`` as one row for
    every sequence; the same array for a decoding step), ``o [B, T, H, V]``. Sequence ``s``
    is tokens ``seq_t0[s] .. seq_t1[s]-1`` of batch row ``seq_b[s]``.
    """
    for task in prange(task_seq.shape[0]):
        s = task_seq[task]
        _sweep(
            x, W_in, in_rows[s], W_out, out_rows[s], o, seq_b[s], seq_t0[s], seq_t1[s],
            task_h[task], write_state,
        )  # fmt: skip


# ----------------------------------------------------------------------------- the driver


@functools.lru_cache(maxsize=64)
def _uniform_tasks(N: int, H: int) -> tuple[np.ndarray, np.ndarray]:
    seq = np.repeat(np.arange(N, dtype=np.int64), H)
    hh = np.tile(np.arange(H, dtype=np.int64), N)
    seq.flags.writeable = False
    hh.flags.writeable = False
    return seq, hh


def _tasks(lengths: np.ndarray, H: int) -> tuple[np.ndarray, np.ndarray]:
    """Tasks ``(sequence, head)``, longest sequence first."""
    seq, hh = _uniform_tasks(int(lengths.shape[0]), H)
    order = np.argsort(-lengths[seq], kind="stable")
    return seq[order], hh[order]


def _launch(
    call: Call,
    x: np.ndarray,
    W_in: np.ndarray,
    in_rows: np.ndarray,
    W_out: np.ndarray | None,
    out_rows: np.ndarray,
    seq: tuple[np.ndarray, np.ndarray, np.ndarray],
    task_list: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    dt = x.dtype
    o = np.empty((call.B, call.T, call.H, call.V), dtype=dt)
    seq_b, t0, t1 = seq
    ts, th = task_list
    threads = max(1, min(int(plan(call)["threads"]), ts.shape[0]))
    with launch(threads):
        call_kernel(
            srwm_kernel,
            x, W_in, in_rows, W_in if W_out is None else W_out, out_rows, o,
            seq_b, t0, t1, ts, th, W_out is not None,
        )  # fmt: skip
    return o


def run(call: Call) -> tuple[Any, Any]:
    """``(o, W_final or None)`` of an ``srwm`` sequence call."""
    dt = np.dtype(call.dtype)
    x = as_rows(call.x, dt)
    seq = sequences(call)
    _, t0, t1 = seq
    if call.cu_seqlens is None:
        task_list = _uniform_tasks(call.B, call.H)
    else:
        task_list = _tasks(t1 - t0, call.H)
    rows = np.arange(call.N, dtype=np.int64)
    if call.initial_state is not None:
        W_in, in_rows = as_rows(call.initial_state, dt), rows
    else:  # W0 [H, K, Wd] as the one row of every sequence
        W_in, in_rows = as_rows(call.W0, dt)[None], np.zeros(call.N, np.int64)
    final = None
    if call.output_final_state:
        final = np.empty((call.N, call.H, call.K, W_in.shape[3]), dtype=dt)
    o = _launch(call, x, W_in, in_rows, final, rows, seq, task_list)
    return o.astype(call.x.dtype, copy=False), final


def step(call: Call) -> tuple[Any, Any]:
    """One ``srwm`` decoding step; the pool ``W [P, H, K, Wd]`` is updated in place through
    ``state_indices``.

    A pool of the compute dtype whose last axis is contiguous is read and written in place
    (each task reads its rows before it writes them); any other goes through a C-ordered copy
    of its rows, written back. Validation has refused read-only pools, repeated indices and
    copied inputs that view the pool.
    """
    dt = np.dtype(call.dtype)
    x = as_rows(call.x, dt)
    pool = call.state_pool
    N = call.N
    rows = np.arange(N, dtype=np.int64) if call.state_indices is None else call.state_indices
    seq = (np.arange(N, dtype=np.int64), np.zeros(N, np.int64), np.ones(N, np.int64))
    task_list = _uniform_tasks(N, call.H)
    if pool.dtype == dt and unit_last(pool):
        o = _launch(call, x, pool, rows, pool, rows, seq, task_list)
    else:
        state = np.ascontiguousarray(np.asarray(pool)[rows], dtype=dt)
        local = np.arange(N, dtype=np.int64)
        o = _launch(call, x, state, local, state, local, seq, task_list)
        pool[rows] = state
    return o[:, 0].astype(call.x.dtype, copy=False), pool
