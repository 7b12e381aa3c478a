"""The Recurrent DeltaNet (``recurrent_delta_rule``, Irie et al. 2021): the recurrent form and
decoding steps.

Per (sequence, head), with ``o_0`` zero or the given last output::

    h   = tanh(o_{t-1})
    qh  = softmax(q_t + R_q h)      kh = softmax(k_t + R_k h)      (over K)
    vh  = v_t + R_v h               b  = sigmoid(beta_t + r_beta . h)
    S_t = S_{t-1} + b kh (vh - S_{t-1}^T kh)^T
    o_t = scale S_t^T qh

Every token's keys, queries, values and rate depend on the previous output through all of its
columns, so the work is split over (sequence, head) only (one ``prange`` task each, longest
first) and a task walks its tokens one after the other.

A token costs **one pass** over the state, kept in a local buffer (``K x V`` rounded up to
blocks of ``VB`` columns, L1-resident at K=V=64 in float32). With the reads of the old state
``pk = S_{t-1}^T kh``, ``pq = S_{t-1}^T qh`` in hand::

    u   = b (vh - pk)
    o_t = scale (pq + (kh . qh) u)        (= scale S_t^T qh, without reading S_t)

``o_t`` gives the next token's ``qh', kh', vh', b'`` (the slow net: ``[R_q; R_k; R_v; r_beta]
h`` as one matrix-vector product, register-blocked over a transposed copy of the four
matrices the driver prepares once per call), and the pass then does, for every key row ``m``::

    S[m, :] += kh_m u        pk' += kh'_m S[m, :]        pq' += qh'_m S[m, :]

(3 FMAs per state element, as the delta family's fused pass). softmax and tanh are vector
code (``_activations``), the sigmoid one libm call per token.

A decoding step reads each recurrent matrix once per sequence: it takes them as given (one dot
product per row) rather than building the transposed copy, which would cost as much as the
step itself at small batches.

A decoding step runs the same kernel with the pools as both the initial and the final state (a
task reads its own rows before it writes them; validation refuses repeated state indices).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import prange

from fastweights.backends import Call

from ._activations import LANES, sigmoid, softmax_into, tanh_into
from ._jit import jit, prefer_512, prefetch, row
from ._layout import as_rows, call_kernel, dummy, launch, sequences, unit_last
from ._passes import VB
from ._plan import plan

ZB = 64
"""Columns of the slow net's product kept in registers at a time (a compile-time constant);
the product's ``2K + V`` columns are padded to a multiple of it."""

AHEAD = 4
"""Tokens ahead whose input rows a step prefetches."""

CACHE_LINE = 64

Array = Any
_pass = jit(nrt=False, noalias=True)


@_pass
def _state_pass(
    Sb: Array, x: int, U: Array, KA: Array, KB: Array, QB: Array, PK: Array, PQ: Array
) -> None:
    """Block ``x``: ``S += KA u^T`` (``u = U[x]``), then ``pk = S^T KB``, ``pq = S^T QB``."""
    prefer_512()
    for j in range(VB):
        PK[x, j] = 0.0
        PQ[x, j] = 0.0
    for m in range(Sb.shape[1]):
        a = KA[m]
        b = KB[m]
        c = QB[m]
        for j in range(VB):
            s = Sb[x, m, j] + a * U[x, j]
            Sb[x, m, j] = s
            PK[x, j] += b * s
            PQ[x, j] += c * s


@_pass
def _slow_net(RT: Array, h: int, HB: Array, V: int, Z: Array, A: Array) -> None:
    """``Z = RT[0, h]^T HB[:V]``, ``ZB`` columns at a time accumulated in ``A`` (registers),
    in two sets (even and odd ``j``) so that the FMAs do not wait on each other.

    (Indexing ``Z`` inside the ``j`` loop, or a stepped ``range`` over the blocks, kept LLVM
    from holding the accumulators in registers: 10-15x slower.)"""
    prefer_512()
    for c in range(RT.shape[3] // ZB):
        c0 = c * ZB
        for i in range(ZB):
            A[i] = 0.0
            A[ZB + i] = 0.0
        for jj in range(V // 2):  # (a stepped range kept the index checks in the loop)
            j = 2 * jj
            r0 = row(RT, 0, h, j, c0)
            r1 = row(RT, 0, h, j + 1, c0)
            h0 = HB[j]
            h1 = HB[j + 1]
            for i in range(ZB):
                A[i] += h0 * r0[i]
                A[ZB + i] += h1 * r1[i]
        if V % 2:
            r0 = row(RT, 0, h, V - 1, c0)
            h0 = HB[V - 1]
            for i in range(ZB):
                A[i] += h0 * r0[i]
        for i in range(ZB):
            Z[c0 + i] = A[i] + A[ZB + i]


@jit(nrt=False, noalias=True, reduce=True)
def _slow_net_rows(
    Rq: Array, Rk: Array, Rv: Array, h: int, HB: Array, K: int, V: int, Z: Array, zero: Array
) -> None:
    """``Z = [R_q[h]; R_k[h]; R_v[h]] HB[:V]`` from the matrices as given (``[1, H, rows,
    V]``): one dot product per row. Slower than :func:`_slow_net` per token, but it reads each
    matrix once and needs no transposed copy: the decoding step's version. ``zero[0]`` is a
    zero of the compute dtype."""
    prefer_512()
    for m in range(K):
        r = row(Rq, 0, h, m, 0)
        s = zero[0]
        for j in range(V):
            s += r[j] * HB[j]
        Z[m] = s
    for m in range(K):
        r = row(Rk, 0, h, m, 0)
        s = zero[0]
        for j in range(V):
            s += r[j] * HB[j]
        Z[K + m] = s
    for i in range(V):
        r = row(Rv, 0, h, i, 0)
        s = zero[0]
        for j in range(V):
            s += r[j] * HB[j]
        Z[2 * K + i] = s


@jit(nrt=False, reduce=True)
def _inputs_of(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    RT: Array,
    RB: Array,
    Rq: Array,
    Rk: Array,
    Rv: Array,
    natural: bool,
    bb: int,
    t: int,
    h: int,
    OB: Array,
    HB: Array,
    Z: Array,
    QN: Array,
    KN: Array,
    VN: Array,
    g: Array,
    red: Array,
    M: Array,
    zero: Array,
) -> float:
    """The slow net at token ``t`` fed the last output ``OB``: ``QN = qh``, ``KN = kh``,
    ``VN[:V] = vh``; returns ``b`` (float64). ``Z`` holds ``2 ZB`` scratch elements past the
    product's columns; the product reads ``Rq, Rk, Rv`` if ``natural``, else ``RT``."""
    K = QN.shape[0]
    V = v.shape[3]
    tanh_into(OB, V, HB, g, red)
    if natural:
        _slow_net_rows(Rq, Rk, Rv, h, HB, K, V, Z, zero)
    else:
        nz = RT.shape[3]
        _slow_net(RT, h, HB, V, Z[:nz], Z[nz : nz + 2 * ZB])
    softmax_into(row(q, bb, t, h, 0), Z, 0, K, QN, g, red, M)
    softmax_into(row(k, bb, t, h, 0), Z, K, K, KN, g, red, M)
    vr = row(v, bb, t, h, 0)
    for j in range(V):
        VN[j] = vr[j] + Z[2 * K + j]
    rb = row(RB, 0, h, 0, 0)
    x = np.float64(row(beta, bb, t, h, 0)[0])
    for j in range(V):
        x += rb[j] * HB[j]
    return sigmoid(x)


@jit(nrt=False)
def _prefetch_token(q: Array, k: Array, v: Array, o: Array, bb: int, t: int, h: int) -> None:
    """Prefetch the rows token ``t`` reads (``q, k, v``) and writes (``o``)."""
    step = max(1, CACHE_LINE // v.itemsize)
    pq = row(q, bb, t, h, 0)
    pk = row(k, bb, t, h, 0)
    for x in range(0, q.shape[3], step):
        prefetch(pq, x)
        prefetch(pk, x)
    pv = row(v, bb, t, h, 0)
    po = row(o, bb, t, h, 0)
    for x in range(0, v.shape[3], step):
        prefetch(pv, x)
        prefetch(po, x)


@jit()
def _sweep(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    RT: Array,
    RB: Array,
    Rq: Array,
    Rk: Array,
    Rv: Array,
    natural: bool,
    S_in: Array,
    o_in: Array,
    in_row: int,
    S_out: Array,
    o_out: Array,
    out_row: int,
    o: Array,
    bb: int,
    t0: int,
    t1: int,
    h: int,
    has_init: bool,
    write_state: bool,
    scale: float,
) -> None:
    """One (sequence, head) from start to end."""
    dt = v.dtype
    K = k.shape[3]
    V = v.shape[3]
    nb = -(-V // VB)
    Vp = nb * VB
    nz = 2 * K + V if natural else RT.shape[3]
    KV = max(K, V)
    # Scratch, carved from one allocation.
    sizes = (nb * K * VB, 5 * Vp, 4 * K, 2 * KV + nz + 2 * ZB + V + LANES + 3)
    buf = np.empty(sum(sizes), dt)
    Sb = buf[: sizes[0]].reshape((nb, K, VB))
    o0 = sizes[0]
    U = buf[o0 : o0 + Vp].reshape((nb, VB))
    PK = buf[o0 + Vp : o0 + 2 * Vp].reshape((nb, VB))
    PQ = buf[o0 + 2 * Vp : o0 + 3 * Vp].reshape((nb, VB))
    VN = buf[o0 + 3 * Vp : o0 + 4 * Vp]  # vh of the next token (zero past V)
    OB = buf[o0 + 4 * Vp : o0 + 5 * Vp]  # the last output (zero past V)
    o0 += sizes[1]
    KA = buf[o0 : o0 + K]  # kh of this token
    QC = buf[o0 + K : o0 + 2 * K]  # qh of this token
    KN = buf[o0 + 2 * K : o0 + 3 * K]  # kh, qh of the next token
    QN = buf[o0 + 3 * K : o0 + 4 * K]
    o0 += sizes[2]
    g = buf[o0 : o0 + KV]
    red = buf[o0 + KV : o0 + 2 * KV]
    o0 += 2 * KV
    Z = buf[o0 : o0 + nz + 2 * ZB]
    o0 += nz + 2 * ZB
    HB = buf[o0 : o0 + V]
    M = buf[o0 + V : o0 + V + LANES]
    cst = buf[o0 + V + LANES : o0 + V + LANES + 3]  # 0, scale, b in the compute dtype
    cst[0] = 0.0
    cst[1] = scale
    for j in range(Vp):
        VN[j] = 0.0
        OB[j] = 0.0
    for x in range(nb):
        j0 = x * VB
        nv = min(VB, V - j0)
        for i in range(K):
            if has_init:
                src = row(S_in, in_row, h, i, j0)
                for j in range(nv):
                    Sb[x, i, j] = src[j]
                for j in range(nv, VB):
                    Sb[x, i, j] = 0.0
            else:
                for j in range(VB):
                    Sb[x, i, j] = 0.0
        for j in range(VB):
            U[x, j] = 0.0
            PK[x, j] = 0.0
            PQ[x, j] = 0.0
    if has_init:
        last = row(o_in, in_row, h, 0, 0)
        for j in range(V):
            OB[j] = last[j]
    for i in range(K):
        KA[i] = 0.0
    bn = 0.0
    if t1 > t0:
        bn = _inputs_of(
            q, k, v, beta, RT, RB, Rq, Rk, Rv, natural, bb, t0, h, OB, HB, Z, QN, KN, VN, g,
            red, M, cst,
        )  # fmt: skip
        if has_init:  # the first token's reads of the initial state (U = 0: no write)
            for x in range(nb):
                _state_pass(Sb, x, U, KA, KN, QN, PK, PQ)
    for t in range(t0, t1):
        if t + AHEAD < t1:
            _prefetch_token(q, k, v, o, bb, t + AHEAD, h)
        cst[2] = bn
        b = cst[2]
        sc = cst[1]
        kq = cst[0]
        for i in range(K):
            KA[i] = KN[i]
            QC[i] = QN[i]
            kq += KN[i] * QN[i]
        for x in range(nb):
            j0 = x * VB
            for j in range(VB):
                u = b * (VN[j0 + j] - PK[x, j])
                U[x, j] = u
                OB[j0 + j] = sc * (PQ[x, j] + kq * u)
        orow = row(o, bb, t, h, 0)
        for j in range(V):
            orow[j] = OB[j]
        if t + 1 < t1:
            bn = _inputs_of(
                q, k, v, beta, RT, RB, Rq, Rk, Rv, natural, bb, t + 1, h, OB, HB, Z, QN, KN,
                VN, g, red, M, cst,
            )  # fmt: skip
        else:  # the last write: the reads that come with it are not used
            for i in range(K):
                KN[i] = 0.0
                QN[i] = 0.0
        for x in range(nb):
            _state_pass(Sb, x, U, KA, KN, QN, PK, PQ)
    if not write_state:
        return
    for x in range(nb):
        j0 = x * VB
        nv = min(VB, V - j0)
        for i in range(K):
            dst = row(S_out, out_row, h, i, j0)
            for j in range(nv):
                dst[j] = Sb[x, i, j]
    last = row(o_out, out_row, h, 0, 0)
    for j in range(V):
        last[j] = OB[j]


@jit(parallel=True)
def recurrent_delta_kernel(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    RT: Array,
    RB: Array,
    Rq: Array,
    Rk: Array,
    Rv: Array,
    natural: bool,
    S_in: Array,
    o_in: Array,
    in_rows: Array,
    S_out: Array,
    o_out: Array,
    out_rows: Array,
    o: Array,
    seq_b: Array,
    seq_t0: Array,
    seq_t1: Array,
    task_seq: Array,
    task_h: Array,
    has_init: bool,
    write_state: bool,
    scale: float,
) -> None:
    """Run every task ``(sequence, head)`` of a call, in parallel.

    Arrays are in the compute dtype, last axes contiguous: ``q, k [B, T, H, K]``,
    ``v [B, T, H, V]``, ``beta [B, T, H, 1]``, ``RT [1, H, V, 2K + V]`` rounded up to ``ZB``
    columns (``RT[0, h, j]`` is column ``j`` of ``R_q[h]``, ``R_k[h]``, ``R_v[h]``, then
    zeros), ``RB [1, H, 1, V]`` (``r_beta``), or with ``natural`` the matrices as given,
    ``Rq, Rk [1, H, K, V]``, ``Rv [1, H, V, V]`` (``RT`` then unused), states
    ``S [P, H, K, V]`` and last outputs ``[P, H, 1, V]`` (rows ``in_rows`` / ``out_rows`` per
    sequence; the same arrays for a decoding step), ``o [B, T, H, V]``. Sequence ``s`` is
    tokens ``seq_t0[s] .. seq_t1[s]-1`` of batch row ``seq_b[s]``.
    """
    for task in prange(task_seq.shape[0]):
        s = task_seq[task]
        _sweep(
            q, k, v, beta, RT, RB, Rq, Rk, Rv, natural, S_in, o_in, in_rows[s], S_out, o_out,
            out_rows[s], o,
            seq_b[s], seq_t0[s], seq_t1[s], task_h[task], has_init, write_state, scale,
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


def slow_net_matrix(call: Call, dt: np.dtype) -> np.ndarray:
    """``RT [1, H, V, 2K + V]`` (columns rounded up to a multiple of ``ZB``, zeros): ``R_q,
    R_k, R_v`` transposed side by side, so that one matrix-vector product per token gives the
    three pre-activations."""
    H, K, V = call.H, call.K, call.V
    nz = -(-(2 * K + V) // ZB) * ZB
    RT = np.zeros((1, H, V, nz), dtype=dt)
    RT[0, :, :, :K] = np.swapaxes(np.asarray(call.R_q), 1, 2)
    RT[0, :, :, K : 2 * K] = np.swapaxes(np.asarray(call.R_k), 1, 2)
    RT[0, :, :, 2 * K : 2 * K + V] = np.swapaxes(np.asarray(call.R_v), 1, 2)
    return RT


def _inputs(call: Call, natural: bool) -> tuple[np.ndarray, ...]:
    """The kernel's inputs in the compute dtype: ``q, k, v, beta, RT, RB, Rq, Rk, Rv``; the
    slow net reads ``Rq, Rk, Rv`` as given if ``natural`` (``RT`` a dummy), else the
    transposed copy ``RT`` (``Rq, Rk, Rv`` dummies)."""
    dt = np.dtype(call.dtype)
    q, k, v = as_rows(call.q, dt), as_rows(call.k, dt), as_rows(call.v, dt)
    beta = np.asarray(call.beta, dtype=dt)[..., None]  # [B, T, H, 1]: a unit last axis
    RB = np.ascontiguousarray(np.asarray(call.r_beta, dtype=dt)).reshape(1, call.H, 1, call.V)
    if natural:
        Rs = tuple(as_rows(getattr(call, n), dt)[None] for n in ("R_q", "R_k", "R_v"))
        return q, k, v, beta, dummy(dt), RB, *Rs
    return q, k, v, beta, slow_net_matrix(call, dt), RB, dummy(dt), dummy(dt), dummy(dt)


def _threads(call: Call, tasks: int) -> int:
    return max(1, min(int(plan(call)["threads"]), tasks))


def _launch(
    call: Call,
    inputs: tuple[np.ndarray, ...],
    state_in: tuple[np.ndarray, np.ndarray] | None,
    in_rows: np.ndarray,
    state_out: tuple[np.ndarray, np.ndarray] | None,
    out_rows: np.ndarray,
    seq: tuple[np.ndarray, np.ndarray, np.ndarray],
    task_list: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    q, k, v, beta, RT, RB, Rq, Rk, Rv = inputs
    dt = v.dtype
    o = np.empty((call.B, call.T, call.H, call.V), dtype=dt)
    seq_b, t0, t1 = seq
    ts, th = task_list
    S_in, o_in = (dummy(dt), dummy(dt)) if state_in is None else state_in
    S_out, o_out = (dummy(dt), dummy(dt)) if state_out is None else state_out
    with launch(_threads(call, ts.shape[0])):
        call_kernel(
            recurrent_delta_kernel,
            q, k, v, beta, RT, RB, Rq, Rk, Rv, call.is_step, S_in, o_in, in_rows, S_out,
            o_out, out_rows,
            o, seq_b, t0, t1, ts, th,
            state_in is not None, state_out is not None, float(call.scale),
        )  # fmt: skip
    return o


def run(call: Call) -> tuple[Any, Any]:
    """``(o, (S, o_last) or None)`` of a ``recurrent_delta_rule`` sequence call."""
    inputs = _inputs(call, natural=call.is_step)
    dt = inputs[2].dtype
    seq = sequences(call)
    _, t0, t1 = seq
    if call.cu_seqlens is None:
        task_list = _uniform_tasks(call.B, call.H)
    else:
        task_list = _tasks(t1 - t0, call.H)
    rows = np.arange(call.N, dtype=np.int64)
    init = None
    if call.initial_state is not None:
        S0, last0 = call.initial_state
        init = (as_rows(S0, dt), as_rows(last0, dt)[:, :, None, :])
    final = None
    if call.output_final_state:
        final = (
            np.empty((call.N, call.H, call.K, call.V), dtype=dt),
            np.empty((call.N, call.H, call.V), dtype=dt),
        )
    out = None if final is None else (final[0], final[1][:, :, None, :])
    o = _launch(call, inputs, init, rows, out, rows, seq, task_list)
    return o.astype(call.v.dtype, copy=False), final


def step(call: Call) -> tuple[Any, Any]:
    """One ``recurrent_delta_rule`` decoding step; the pools ``(S [P, H, K, V], o [P, H, V])``
    are updated in place through ``state_indices``.

    A pool of the compute dtype whose last axis is contiguous is read and written in place
    (each task reads its rows before it writes them); any other goes through a C-ordered copy
    of its rows, written back. Validation has refused read-only pools, repeated indices and
    copied inputs that view the pools.
    """
    inputs = _inputs(call, natural=call.is_step)
    dt = inputs[2].dtype
    Spool, opool = call.state_pool
    N = call.N
    rows = np.arange(N, dtype=np.int64) if call.state_indices is None else call.state_indices
    local = np.arange(N, dtype=np.int64)
    seq = (local, np.zeros(N, np.int64), np.ones(N, np.int64))
    task_list = _uniform_tasks(N, call.H)
    # Each pool in place when the kernel can address it, else a copy of its rows.
    S_direct = Spool.dtype == dt and unit_last(Spool)
    o_direct = opool.dtype == dt and unit_last(opool)
    if S_direct and o_direct:
        state = (Spool, opool[:, :, None, :])
        o = _launch(call, inputs, state, rows, state, rows, seq, task_list)
        return o[:, 0].astype(call.v.dtype, copy=False), call.state_pool
    # Either pool needs a copy: both go through C-ordered copies of their rows.
    S = np.ascontiguousarray(np.asarray(Spool)[rows], dtype=dt)
    last = np.ascontiguousarray(np.asarray(opool)[rows], dtype=dt)
    state = (S, last[:, :, None, :])
    o = _launch(call, inputs, state, local, state, local, seq, task_list)
    Spool[rows] = S
    opool[rows] = last
    return o[:, 0].astype(call.v.dtype, copy=False), call.state_pool
