"""The DPLR rule (``dplr``; ``iplr`` and ``rwkv7`` arrive rewritten into it): the recurrent
form and decoding steps.

Per (sequence, value head), with ``alpha_t = exp(gk_t)`` per key row (1 without ``gk``)::

    S_t = Diag(alpha_t) S_{t-1} + b_t u_t + k_t v_t^T,    u_t = a_t^T S_{t-1}
    o_t = S_t^T q~_t                                       q~ = scale * q

A key row whose ``gk`` is ``-inf`` drops its decayed part exactly (selected, not multiplied
by 0: a NaN or Inf in that row does not reach the decayed part); ``b_t u_t`` still reads the
old row, as in the float64 definition (``fastweights/rules/dplr/recurrent.py``).

Work is split into tasks (sequence, value head, range of value blocks of ``VB`` columns), run
in parallel with ``prange`` (see :func:`._layout.tasks`). A task keeps its ``K x VB`` blocks of
the state in a local buffer, L1-resident, and runs one fused pass per step and block::

    S[m, :] = alpha_m S[m, :] + b_m u + k_m v       for every key row m
    o      += q~_m S[m, :]
    u'     += a'_m S[m, :]                            a' = a of the next step: u of the next step

so the read ``u`` of a step is accumulated by the pass of the step before it (the first one by
a read pass over the initial state, or zero without one). ``u``, ``u'``, ``v`` and ``o`` stay
in registers for the whole pass (``VB`` is a compile-time constant): 5 vector operations per
state element. The state is never rescaled: NaN and Inf propagate exactly as in the plain
recurrence.

Per-step vectors (``q~``, ``k`` l2-normalised if asked, ``a``, ``b``, ``alpha`` and the reset
flags) are prepared for ``TC`` steps at a time, once for all the task's value blocks.

A decoding step runs the same kernel with the pool as both the initial and the final state (a
task reads its own rows before it writes them; validation refuses repeated state indices).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from fastweights.backends import L2NORM_EPS, Call

from ._jit import address, jit, prefer_512, prefetch_at, row
from ._layout import (
    as_rows,
    call_kernel,
    dummy,
    launch,
    sequences,
    tasks,
    uniform_tasks,
    unit_last,
)
from ._math import UNDERFLOW, UNDERFLOW32, _poly_f32, _poly_f64, _reduce_f32, _reduce_f64
from ._passes import VB, _prefetch_row
from ._plan import plan

TC = 16
"""Steps whose per-step vectors are prepared together."""

CACHE_LINE = 64
"""Bytes per cache line: one prefetch per line."""

Array = Any
_pass = jit(nrt=False, noalias=True)


@_pass
def _step_pass(
    Sb: Array,
    x: int,
    U: Array,
    UN: Array,
    VS: Array,
    OS: Array,
    i: int,
    AL: Array,
    BP: Array,
    KP: Array,
    QP: Array,
    AP: Array,
    PFA: Array,
    p0: int,
    p1: int,
) -> None:
    """Step ``i`` of a chunk on block ``x``, no reset row: ``S = Diag(AL[i]) S + BP[i] u^T +
    KP[i] v^T`` (``v = VS``), ``o = S^T QP[i]`` into ``OS``, the next step's read
    ``u = S^T AP[i + 1]``; prefetches ``PFA[p0:p1]``, spread over the rows."""
    prefer_512()
    for j in range(VB):
        OS[j] = 0.0
        UN[j] = 0.0
    K = Sb.shape[1]
    p, every, nxt = p0, max(1, K // max(p1 - p0, 1)), 0
    for m in range(K):
        p, nxt = _prefetch_row(PFA, p, p1, m, nxt, every)
        al = AL[i, m]
        bm = BP[i, m]
        km = KP[i, m]
        qm = QP[i, m]
        am = AP[i + 1, m]
        for j in range(VB):
            s = al * Sb[x, m, j] + bm * U[x, j] + km * VS[j]
            Sb[x, m, j] = s
            OS[j] += qm * s
            UN[j] += am * s
    for j in range(VB):
        U[x, j] = UN[j]
    for r in range(p, p1):
        prefetch_at(PFA[r])


@_pass
def _step_pass_reset(
    Sb: Array,
    x: int,
    U: Array,
    UN: Array,
    VS: Array,
    OS: Array,
    i: int,
    AL: Array,
    RS: Array,
    BP: Array,
    KP: Array,
    QP: Array,
    AP: Array,
    PFA: Array,
    p0: int,
    p1: int,
) -> None:
    """:func:`_step_pass` where the rows flagged in ``RS[i]`` (``gk = -inf``) drop their
    decayed part exactly, even NaN or Inf."""
    prefer_512()
    for j in range(VB):
        OS[j] = 0.0
        UN[j] = 0.0
    K = Sb.shape[1]
    p, every, nxt = p0, max(1, K // max(p1 - p0, 1)), 0
    for m in range(K):
        p, nxt = _prefetch_row(PFA, p, p1, m, nxt, every)
        bm = BP[i, m]
        km = KP[i, m]
        qm = QP[i, m]
        am = AP[i + 1, m]
        if RS[i, m] != 0.0:
            for j in range(VB):
                s = bm * U[x, j] + km * VS[j]
                Sb[x, m, j] = s
                OS[j] += qm * s
                UN[j] += am * s
            continue
        al = AL[i, m]
        for j in range(VB):
            s = al * Sb[x, m, j] + bm * U[x, j] + km * VS[j]
            Sb[x, m, j] = s
            OS[j] += qm * s
            UN[j] += am * s
    for j in range(VB):
        U[x, j] = UN[j]
    for r in range(p, p1):
        prefetch_at(PFA[r])


@_pass
def _chunk_steps(
    Sb: Array,
    x: int,
    U: Array,
    UN: Array,
    VS: Array,
    OS: Array,
    AL: Array,
    RS: Array,
    RSF: Array,
    BP: Array,
    KP: Array,
    QP: Array,
    AP: Array,
    v: Array,
    o: Array,
    bb: int,
    t: int,
    hv: int,
    j0: int,
    nv: int,
    rc: int,
    PFA: Array,
    pf0: int,
    per: int,
) -> None:
    """Steps ``0 .. rc-1`` of a chunk (tokens ``t ..``) on block ``x`` (columns ``j0 ..
    j0+nv``): ``v`` in through ``VS`` (zero-padded), ``o`` out through ``OS``. Step ``i``
    prefetches ``per`` lines of ``PFA`` from ``pf0 + i per``."""
    n = PFA.shape[0]
    full = nv == VB
    for i in range(rc):
        vr = row(v, bb, t + i, hv, j0)
        if full:  # copies of a compile-time length: a few vector moves
            for j in range(VB):
                VS[j] = vr[j]
        else:
            for j in range(nv):
                VS[j] = vr[j]
        p0 = min(pf0 + i * per, n)
        p1 = min(p0 + per, n)
        if RSF[i]:
            _step_pass_reset(Sb, x, U, UN, VS, OS, i, AL, RS, BP, KP, QP, AP, PFA, p0, p1)
        else:
            _step_pass(Sb, x, U, UN, VS, OS, i, AL, BP, KP, QP, AP, PFA, p0, p1)
        orow = row(o, bb, t + i, hv, j0)
        if full:
            for j in range(VB):
                orow[j] = OS[j]
        else:
            for j in range(nv):
                orow[j] = OS[j]


@_pass
def _read_pass(Sb: Array, x: int, U: Array, AP: Array) -> None:
    """``u = S^T AP[0]`` of block ``x``: the first step's read of an initial state."""
    prefer_512()
    for j in range(VB):
        U[x, j] = 0.0
    for m in range(Sb.shape[1]):
        am = AP[0, m]
        for j in range(VB):
            U[x, j] += am * Sb[x, m, j]


@jit(nrt=False, reduce=True)
def _prepare(
    q: Array,
    k: Array,
    a: Array,
    b: Array,
    gk: Array,
    bb: int,
    h: int,
    hv: int,
    t0: int,
    r0: int,
    rc: int,
    R: int,
    has_gate: bool,
    l2norm: bool,
    scale: float,
    QP: Array,
    KP: Array,
    AP: Array,
    BP: Array,
    AL: Array,
    RS: Array,
    RSF: Array,
    red: Array,
    Z: Array,
) -> None:
    """Per-step vectors of steps ``r0 .. r0+rc-1`` (tokens ``t0 + r``) in rows ``0 .. rc-1``:
    ``QP = q~``, ``KP = k``, ``BP = b``, ``AL = exp(gk)``, ``RS`` 1 where ``gk = -inf`` (``RSF``:
    any in the step); ``AP`` rows ``0 .. rc``: ``a`` of steps ``r0 .. r0+rc`` (0 past the
    end). ``Z[0]`` is a zero of the compute dtype, ``Z[1:3]`` scratch."""
    prefer_512()
    K = KP.shape[1]
    for i in range(rc):
        t = t0 + r0 + i
        kr = row(k, bb, t, h, 0)
        qr = row(q, bb, t, h, 0)
        br = row(b, bb, t, hv, 0)
        Z[1] = 1.0
        Z[2] = scale
        if l2norm:
            sk = Z[0]
            sq = Z[0]
            for m in range(K):
                sk += kr[m] * kr[m]
                sq += qr[m] * qr[m]
            Z[1] = 1.0 / np.sqrt(sk + L2NORM_EPS)
            Z[2] = scale / np.sqrt(sq + L2NORM_EPS)
        fk = Z[1]
        fq = Z[2]
        for m in range(K):
            KP[i, m] = kr[m] * fk
            QP[i, m] = qr[m] * fq
            BP[i, m] = br[m]
        n_reset = Z[0]
        if has_gate:
            # exp(gk) as in _math.exp_f32 / exp_f64, fused with the reset flags.
            gr = row(gk, bb, t, hv, 0)
            if AL.itemsize == 4:
                bits32 = AL[i].view(np.int32)
                for m in range(K):
                    bits32[m], red[m] = _reduce_f32(gr[m])
                for m in range(K):
                    g = gr[m]
                    e = _poly_f32(red[m]) * AL[i, m]
                    AL[i, m] = np.float32(0.0) if g < np.float32(UNDERFLOW32) else e
                    r = 1.0 if g == -np.inf else 0.0
                    RS[i, m] = r
                    n_reset += r
            else:
                bits64 = AL[i].view(np.int64)
                for m in range(K):
                    bits64[m], red[m] = _reduce_f64(np.float64(gr[m]))
                for m in range(K):
                    g = gr[m]
                    e = _poly_f64(red[m]) * AL[i, m]
                    AL[i, m] = 0.0 if g < UNDERFLOW else e
                    r = 1.0 if g == -np.inf else 0.0
                    RS[i, m] = r
                    n_reset += r
        else:
            for m in range(K):
                AL[i, m] = 1.0
        RSF[i] = n_reset > 0.0
    for i in range(rc + 1):
        if r0 + i < R:
            ar = row(a, bb, t0 + r0 + i, hv, 0)
            for m in range(K):
                AP[i, m] = ar[m]
        else:
            for m in range(K):
                AP[i, m] = 0.0


@jit(nrt=False)
def prefetch_capacity(K: int, cols: int, itemsize: int, steps: int) -> int:
    """The most lines :func:`_prefetch_lines` lists for ``steps`` steps."""
    line = max(1, CACHE_LINE // itemsize)
    return steps * (5 * -(-K // line) + 2 * -(-cols // line))


@jit(nrt=False)
def _prefetch_lines(
    q: Array,
    k: Array,
    v: Array,
    a: Array,
    b: Array,
    gk: Array,
    o: Array,
    bb: int,
    h: int,
    hv: int,
    t0: int,
    r0: int,
    rc: int,
    c0: int,
    c1: int,
    has_gate: bool,
    PFA: Array,
) -> int:
    """Fill ``PFA`` with the addresses of the cache lines that steps ``r0 .. r0+rc-1`` read
    and write (value columns ``c0 .. c1``); returns how many.

    One head's rows sit ``H * K`` elements apart, a stride the hardware prefetchers do not
    follow across pages, so the kernel prefetches them itself, a chunk ahead.
    """
    K = k.shape[3]
    step = max(1, CACHE_LINE // v.itemsize)
    n = 0
    for i in range(rc):
        t = t0 + r0 + i
        kp = row(k, bb, t, h, 0)
        qp = row(q, bb, t, h, 0)
        ap = row(a, bb, t, hv, 0)
        bp = row(b, bb, t, hv, 0)
        for x in range(0, K, step):
            PFA[n] = address(kp, x)
            PFA[n + 1] = address(qp, x)
            PFA[n + 2] = address(ap, x)
            PFA[n + 3] = address(bp, x)
            n += 4
        if has_gate:
            gp = row(gk, bb, t, hv, 0)
            for x in range(0, K, step):
                PFA[n] = address(gp, x)
                n += 1
        vp = row(v, bb, t, hv, c0)
        op = row(o, bb, t, hv, c0)
        for x in range(0, c1 - c0, step):
            PFA[n] = address(vp, x)
            PFA[n + 1] = address(op, x)
            n += 2
    return n


@jit()
def _sweep(
    q: Array,
    k: Array,
    v: Array,
    a: Array,
    b: Array,
    gk: Array,
    state_in: Array,
    in_row: int,
    state_out: Array,
    out_row: int,
    o: Array,
    bb: int,
    t0: int,
    t1: int,
    hv: int,
    vb0: int,
    vb1: int,
    G: int,
    has_gate: bool,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
) -> None:
    """One (sequence, value head, value blocks ``vb0 .. vb1-1``) from start to end."""
    dt = v.dtype
    K = k.shape[3]
    V = v.shape[3]
    h = hv // G
    nb = vb1 - vb0
    R = t1 - t0
    tc = max(1, min(TC, R))  # a decoding step needs one row of per-step vectors
    n1 = tc + 1
    # Scratch, carved from one allocation.
    sizes = (nb * K * VB, nb * VB, 3 * VB, 5 * tc * K, n1 * K, K + 3)
    buf = np.empty(sum(sizes), dt)
    o0 = sizes[0]
    Sb = buf[:o0].reshape((nb, K, VB))
    U = buf[o0 : o0 + nb * VB].reshape((nb, VB))
    o0 += sizes[1]
    UN = buf[o0 : o0 + VB]
    VS = buf[o0 + VB : o0 + 2 * VB]
    OS = buf[o0 + 2 * VB : o0 + 3 * VB]
    o0 += sizes[2]
    QP = buf[o0 : o0 + tc * K].reshape((tc, K))
    KP = buf[o0 + tc * K : o0 + 2 * tc * K].reshape((tc, K))
    BP = buf[o0 + 2 * tc * K : o0 + 3 * tc * K].reshape((tc, K))
    AL = buf[o0 + 3 * tc * K : o0 + 4 * tc * K].reshape((tc, K))
    RS = buf[o0 + 4 * tc * K : o0 + 5 * tc * K].reshape((tc, K))
    o0 += sizes[3]
    AP = buf[o0 : o0 + n1 * K].reshape((n1, K))
    o0 += sizes[4]
    red = buf[o0 : o0 + K]
    Z = buf[o0 + K : o0 + K + 3]
    Z[0] = 0.0
    RSF = np.zeros(tc, np.bool_)
    c0 = vb0 * VB
    c1 = min(vb1 * VB, V)
    PFA = np.empty(prefetch_capacity(K, c1 - c0, v.itemsize, tc), np.int64)
    for x in range(nb):
        j0 = (vb0 + x) * VB
        nv = min(VB, V - j0)
        for i in range(K):
            if has_init:
                src = row(state_in, in_row, hv, i, j0)
                for j in range(nv):
                    Sb[x, i, j] = src[j]
                for j in range(nv, VB):
                    Sb[x, i, j] = 0.0
            else:
                for j in range(VB):
                    Sb[x, i, j] = 0.0
        for j in range(VB):
            U[x, j] = 0.0
    for j in range(VB):
        VS[j] = 0.0
    n = 0
    if R > 0:
        n = _prefetch_lines(
            q, k, v, a, b, gk, o, bb, h, hv, t0, 0, min(tc, R), c0, c1, has_gate, PFA
        )  # fmt: skip
    for p in range(n):
        prefetch_at(PFA[p])
    for r0 in range(0, R, tc):
        rc = min(tc, R - r0)
        # The passes of this chunk prefetch the next one's lines, `per` in each pass.
        n = 0
        if r0 + tc < R:
            n = _prefetch_lines(
                q, k, v, a, b, gk, o, bb, h, hv, t0, r0 + tc, min(tc, R - r0 - tc), c0, c1,
                has_gate, PFA,
            )  # fmt: skip
        per = -(-n // (rc * nb))
        _prepare(
            q, k, a, b, gk, bb, h, hv, t0, r0, rc, R, has_gate, l2norm, scale,
            QP, KP, AP, BP, AL, RS, RSF, red, Z,
        )  # fmt: skip
        for x in range(nb):
            j0 = (vb0 + x) * VB
            nv = min(VB, V - j0)
            if r0 == 0 and has_init:
                _read_pass(Sb, x, U, AP)
            _chunk_steps(
                Sb, x, U, UN, VS, OS, AL, RS, RSF, BP, KP, QP, AP, v, o, bb, t0 + r0, hv, j0,
                nv, rc, PFA[:n], x * rc * per, per,
            )  # fmt: skip
    if not write_state:
        return
    for x in range(nb):
        j0 = (vb0 + x) * VB
        nv = min(VB, V - j0)
        for i in range(K):
            dst = row(state_out, out_row, hv, i, j0)
            for j in range(nv):
                dst[j] = Sb[x, i, j]


@jit(parallel=True)
def dplr_kernel(
    q: Array,
    k: Array,
    v: Array,
    a: Array,
    b: Array,
    gk: Array,
    state_in: Array,
    in_rows: Array,
    state_out: Array,
    out_rows: Array,
    o: Array,
    seq_b: Array,
    seq_t0: Array,
    seq_t1: Array,
    task_seq: Array,
    task_hv: Array,
    task_vb0: Array,
    task_vb1: Array,
    G: int,
    has_gate: bool,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
) -> None:
    """Run every task ``(sequence, value head, value blocks)`` of a call, in parallel.

    Arrays are in the caller's layout and the compute dtype, last axes contiguous:
    ``q, k [B, T, H, K]``, ``v [B, T, HV, V]``, ``a, b, gk [B, T, HV, K]``, states
    ``[P, HV, K, V]`` (rows ``in_rows`` / ``out_rows`` per sequence; the same array for a
    decoding step), ``o [B, T, HV, V]``. Sequence ``s`` is tokens ``seq_t0[s] .. seq_t1[s]-1``
    of batch row ``seq_b[s]``.
    """
    for task in prange(task_seq.shape[0]):
        s = task_seq[task]
        _sweep(
            q, k, v, a, b, gk, state_in, in_rows[s], state_out, out_rows[s], o,
            seq_b[s], seq_t0[s], seq_t1[s], task_hv[task], task_vb0[task], task_vb1[task],
            G, has_gate, has_init, write_state, l2norm, scale,
        )  # fmt: skip


# ----------------------------------------------------------------------------- the driver


def _inputs(call: Call) -> tuple[np.ndarray, ...]:
    dt = np.dtype(call.dtype)
    q, k, v = as_rows(call.q, dt), as_rows(call.k, dt), as_rows(call.v, dt)
    a, b = as_rows(call.a, dt), as_rows(call.b, dt)
    gk = dummy(dt) if call.gk is None else as_rows(call.gk, dt)
    return q, k, v, a, b, gk


def _launch(
    call: Call,
    inputs: tuple[np.ndarray, ...],
    state_in: np.ndarray | None,
    in_rows: np.ndarray,
    state_out: np.ndarray | None,
    out_rows: np.ndarray,
    seq: tuple[np.ndarray, np.ndarray, np.ndarray],
    task_list: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    threads: int,
) -> np.ndarray:
    q, k, v, a, b, gk = inputs
    dt = v.dtype
    o = np.empty((call.B, call.T, call.HV, call.V), dtype=dt)
    seq_b, t0, t1 = seq
    ts, th, tv0, tv1 = task_list
    with launch(threads):
        call_kernel(
            dplr_kernel,
            q, k, v, a, b, gk,
            dummy(dt) if state_in is None else state_in, in_rows,
            dummy(dt) if state_out is None else state_out, out_rows,
            o, seq_b, t0, t1, ts, th, tv0, tv1,
            call.HV // call.H, call.gk is not None, state_in is not None,
            state_out is not None, bool(call.use_qk_l2norm), float(call.scale),
        )  # fmt: skip
    return o


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a ``dplr`` sequence call (recurrent form)."""
    inputs = _inputs(call)
    dt = inputs[2].dtype
    seq = sequences(call)
    _, t0, t1 = seq
    n = plan(call)["threads"]
    if call.cu_seqlens is None:
        task_list = uniform_tasks(call.B, call.T, call.HV, call.V, n)
    else:
        task_list = tasks(t1 - t0, call.HV, call.V, n)
    rows = np.arange(call.N, dtype=np.int64)
    init = None if call.initial_state is None else as_rows(call.initial_state, dt)
    final = None
    if call.output_final_state:
        final = np.empty((call.N, call.HV, call.K, call.V), dtype=dt)
    o = _launch(call, inputs, init, rows, final, rows, seq, task_list, n)
    return o.astype(call.v.dtype, copy=False), final


def step(call: Call) -> tuple[Any, Any]:
    """One ``dplr`` decoding step; the pool is updated in place through ``state_indices``.

    A pool of the compute dtype whose last axis is contiguous is read and written in place
    (each task reads its rows before it writes them); any other goes through a C-ordered copy
    of its rows, written back. Validation has refused read-only pools, repeated indices and
    copied inputs that view the pool.
    """
    inputs = _inputs(call)
    dt = inputs[2].dtype
    pool = call.state_pool
    N = call.N
    rows = np.arange(N, dtype=np.int64) if call.state_indices is None else call.state_indices
    seq = (np.arange(N, dtype=np.int64), np.zeros(N, np.int64), np.ones(N, np.int64))
    n = plan(call)["threads"]
    task_list = uniform_tasks(N, 1, call.HV, call.V, n)
    if pool.dtype == dt and unit_last(pool):
        o = _launch(call, inputs, pool, rows, pool, rows, seq, task_list, n)
    else:
        state = np.ascontiguousarray(np.asarray(pool)[rows], dtype=dt)
        local = np.arange(N, dtype=np.int64)
        o = _launch(call, inputs, state, local, state, local, seq, task_list, n)
        pool[rows] = state
    return o[:, 0].astype(call.v.dtype, copy=False), pool
