"""The chunk form (SPEC.md section 3), fused per chunk inside numba, parallel over heads.

Per (sequence, value head) and chunk of ``C`` steps with incoming state ``S`` (``b`` the
log-decay summed inside the chunk; ``Gamma_rs = exp(sum_{s<u<=r} g_u)`` for ``r >= s``)::

    A   = tril(Diag(beta) (K K^T * Gamma), -1)             delta family only
    [W, U] = (I + A)^-1 [Diag(beta) (K * e^b), Diag(beta) V]    forward substitution
    U'  = U - W S                                          Hebbian family: U' = V
    O   = (Q * e^b) S + (Q K^T * Gamma) U'
    S  <- Diag(e^{b_C}) S + (K * e^{b_C - b})^T U'

Every decay factor is a product of the per-step decays ``alpha = exp(g)`` over an interval,
never a ratio of cumulative products: gates of 0 stay exact, strong gates underflow to 0
instead of overflowing, and a ``-inf`` gate gives an exact 0. Per-key-channel decays split the
scores into row blocks of ``SUB`` with the block's first row as reference point (both factors
at most 1) and take the products elementwise on the diagonal blocks. The small matrix
products are loops compiled like the recurrent passes (``noalias``, 512-bit vectors,
single-threaded), not BLAS calls: no thread oversubscription inside ``prange``.

Non-finite inputs propagate causally: masked (future) entries of the ``C x C`` products are
skipped or selected away, never multiplied by zero. A decay of exactly 0 (a ``-inf`` gate, or
one whose ``exp`` underflows) is a hard reset: a chunk ends before such a row, and a chunk
starting on one sets the state (``g``) or that key row (``gk``) to 0 instead of multiplying it
by 0, so a NaN or Inf before the reset does not pass through it.

Chunk size: the rule computes the same function for every chunk size, which only changes the
speed and the rounding. The kernel runs ``min(chunk_size, MAX_CHUNK, longest sequence in rows)``
(rows: tokens times ``num_householder``). Each thread holds its own scratch of three ``C x C``
matrices and about twelve ``C x max(K, V)`` ones, so ``MAX_CHUNK = 1024`` bounds it at about
24 MiB plus ``12 * 8 KiB`` per unit of ``max(K, V)`` in float64 (half in float32); chunks
beyond a few hundred rows are only slower on a CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from fastweights.backends import L2NORM_EPS, SUB_BLOCK

from ._jit import jit, prefer_512, row
from ._math import exp_f32, exp_f64

SUB = SUB_BLOCK
MAX_CHUNK = 1024
"""Largest chunk the kernel runs (see the module docstring)."""

Array = Any
_mm = jit(nrt=False, noalias=True)


@_mm
def _abt(A: Array, B: Array, out: Array, m: int, n: int, BT: Array) -> None:
    """``out[:m, :n] = A[:m] B[:n]^T`` (``BT`` scratch ``[K, C]``)."""
    prefer_512()
    d = A.shape[1]
    C = out.shape[1]
    for j in range(n):
        for x in range(d):
            BT[x, j] = B[j, x]
    for j in range(n, C):
        for x in range(d):
            BT[x, j] = 0.0
    for i in range(m):
        for j in range(C):
            out[i, j] = 0.0
        for x in range(d):
            a = A[i, x]
            for j in range(C):
                out[i, j] += a * BT[x, j]


@_mm
def _ab_acc(A: Array, B: Array, out: Array, m: int, kd: int, sign: float) -> None:
    """``out[:m] += sign * A[:m, :kd] B[:kd]``."""
    prefer_512()
    n = B.shape[1]
    for i in range(m):
        for x in range(kd):
            a = sign * A[i, x]
            for j in range(n):
                out[i, j] += a * B[x, j]


@_mm
def _tril_ab_acc(A: Array, B: Array, out: Array, m: int) -> None:
    """``out[:m] += tril(A[:m, :m]) B[:m]``: entries above the diagonal are never read, so a
    NaN or Inf in a later row of ``B`` does not reach an earlier row of ``out``."""
    prefer_512()
    n = B.shape[1]
    for i in range(m):
        for x in range(i + 1):
            a = A[i, x]
            for j in range(n):
                out[i, j] += a * B[x, j]


@_mm
def _atb_acc(A: Array, B: Array, out: Array, m: int) -> None:
    """``out += A[:m]^T B[:m]``."""
    prefer_512()
    n = B.shape[1]
    for r in range(m):
        for x in range(A.shape[1]):
            a = A[r, x]
            for j in range(n):
                out[x, j] += a * B[r, j]


@_mm
def _solve_unit_lower(A: Array, X: Array, m: int) -> None:
    """``X <- (I + A)^-1 X`` for strictly lower-triangular ``A``, by forward substitution."""
    prefer_512()
    n = X.shape[1]
    for r in range(1, m):
        for s in range(r):
            a = A[r, s]
            for j in range(n):
                X[r, j] -= a * X[s, j]


@jit(nrt=False)
def exp_any(src: Array, out: Array, red: Array) -> None:
    """``out = exp(src)`` in the arrays' dtype (float32 or float64)."""
    if out.itemsize == 4:
        exp_f32(src, out, out.view(np.int32), red)
    else:
        exp_f64(src, out, out.view(np.int64), red)


@jit(nrt=False, reduce=True)
def _vector_scores(
    X: Array, Y: Array, al: Array, out: Array, m: int, strict: bool, E: Array, w: Array
) -> None:
    """``out_rs = sum_i X_ri Y_si prod_{s<u<=r} al_ui`` for ``s <= r < m`` (``s < r`` if
    ``strict``); no other entry of ``out`` is written.

    ``al [C, K]`` per-channel decays ``exp(gk)``. Row blocks of ``SUB`` take the
    off-diagonal part as ``(X * to_row) (Y * from_col)^T`` with the products taken from the
    block's first row (both factors at most 1), the diagonal block elementwise. ``E`` is
    ``[2, C, K]`` and ``w`` ``[2, K]`` scratch.
    """
    K = X.shape[1]
    for a0 in range(0, m, SUB):
        a1 = min(a0 + SUB, m)
        # E[0, r] = X_r prod_{a0 <= u <= r} al_u;  E[1, s] = Y_s prod_{s < u < a0} al_u
        for x in range(K):
            w[0, x] = 1.0
        for r in range(a0, a1):
            for x in range(K):
                w[0, x] *= al[r, x]
                E[0, r, x] = X[r, x] * w[0, x]
        for x in range(K):
            w[0, x] = 1.0
        for s in range(a0 - 1, -1, -1):
            for x in range(K):
                E[1, s, x] = Y[s, x] * w[0, x]
                w[0, x] *= al[s, x]
        for r in range(a0, a1):
            for s in range(a0):
                acc = 0.0
                for x in range(K):
                    acc += E[0, r, x] * E[1, s, x]
                out[r, s] = acc
            # Diagonal block: the product over s < u <= r, grown from s = r downwards.
            for x in range(K):
                w[1, x] = X[r, x]
            for s in range(r, a0 - 1, -1):
                if s < r or not strict:
                    acc = 0.0
                    for x in range(K):
                        acc += w[1, x] * Y[s, x]
                    out[r, s] = acc
                for x in range(K):
                    w[1, x] *= al[s, x]


@jit(nrt=False)
def _scalar_decays(al: Array, m: int, Gam: Array, gam: Array, tail: Array) -> None:
    """From per-step decays ``al [C]`` (float64): ``Gam_rs = prod_{s<u<=r} al_u`` for
    ``s <= r < m`` (no other entry written), ``gam_r = prod_{u<=r} al_u``,
    ``tail_r = prod_{r<u<m} al_u``.

    Products of factors in ``[0, 1]``: exact for gates of 0, exactly 0 after a ``-inf``."""
    for r in range(m):
        p = 1.0
        for s in range(r, -1, -1):
            Gam[r, s] = p
            p *= al[s]
    p = 1.0
    for r in range(m):
        p *= al[r]
        gam[r] = p
    p = 1.0
    for r in range(m - 1, -1, -1):
        tail[r] = p
        p *= al[r]


@jit()
def _chunk_task(
    q: Array,
    k: Array,
    v: Array,
    gate: Array,
    beta: Array,
    state_in: Array,
    in_row: int,
    state_out: Array,
    out_row: int,
    o: Array,
    b: int,
    t0: int,
    t1: int,
    hv: int,
    n_sub: int,
    G: int,
    gate_kind: int,
    erase: bool,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
    C: int,
) -> None:
    """One (sequence, value head), chunk by chunk; ``C >= 1`` sizes every scratch buffer."""
    dt = v.dtype
    K = k.shape[3]
    V = v.shape[3]
    h = hv // G
    R = (t1 - t0) * n_sub
    rb = t0 * n_sub
    S = np.zeros((K, V), dt)
    if has_init:
        for i in range(K):
            src = row(state_in, in_row, hv, i, 0)
            for j in range(V):
                S[i, j] = src[j]
    Kc = np.zeros((C, K), dt)
    Qc = np.zeros((C, K), dt)
    Kd = np.zeros((C, K), dt)
    X = np.zeros((C, K + V), dt)
    U = np.zeros((C, V), dt)
    O = np.zeros((C, V), dt)
    Msc = np.zeros((C, C), dt)
    Aa = np.zeros((C, C), dt)
    Gam = np.zeros((C, C), dt)
    gs = np.zeros(C, np.float64)
    gam = np.zeros(C, np.float64)
    tail = np.zeros(C, np.float64)
    BT = np.zeros((K, C), dt)
    gv = np.zeros((C, K), dt)
    E = np.zeros((2, C, K), dt)
    w = np.zeros((2, K), dt)
    EB = np.zeros((C, K), dt)
    EC = np.zeros(K, dt)
    acc = np.zeros(K, dt)
    red = np.zeros(K, dt)
    bet = np.zeros(C, dt)
    r0 = 0
    while r0 < R:
        m = min(C, R - r0)
        for i in range(m):
            r = r0 + i
            tt = r // n_sub
            sub = r - tt * n_sub
            t = t0 + tt
            # The decay first: a chunk ends before a row whose decay is exactly 0.
            gs[i] = 1.0
            for x in range(K):
                gv[i, x] = 1.0
            if sub == 0 and gate_kind != 0:
                zeros = 0
                if gate_kind == 1:
                    gs[i] = np.exp(np.float64(gate[b, t, hv, 0]))
                    zeros = 1 if gs[i] == 0.0 else 0
                else:
                    gr = row(gate, b, t, hv, 0)
                    for x in range(K):
                        acc[x] = gr[x]
                    exp_any(acc, gv[i], red)
                    for x in range(K):
                        zeros += 1 if gv[i, x] == 0.0 else 0
                if zeros > 0 and i > 0:
                    m = i
                    break
            kr = row(k, b, rb + r, h, 0)
            ss = 0.0
            for x in range(K):
                Kc[i, x] = kr[x]
                ss += Kc[i, x] * Kc[i, x]
            if l2norm:
                f = 1.0 / np.sqrt(ss + L2NORM_EPS)
                for x in range(K):
                    Kc[i, x] = Kc[i, x] * f
            if sub == n_sub - 1:
                qr = row(q, b, t, h, 0)
                ss = 0.0
                for x in range(K):
                    ss += qr[x] * qr[x]
                f = scale / np.sqrt(ss + L2NORM_EPS) if l2norm else scale
                for x in range(K):
                    Qc[i, x] = qr[x] * f
            else:
                for x in range(K):
                    Qc[i, x] = 0.0
            bet[i] = beta[b, rb + r, hv, 0] if erase else 1.0
        # A reset on the chunk's first row: the state (or its key rows) is set to exactly 0,
        # whatever it held; products with the zero decay then stay exactly 0.
        if gate_kind == 1 and gs[0] == 0.0:
            for x in range(K):
                for j in range(V):
                    S[x, j] = 0.0
        elif gate_kind == 2:
            for x in range(K):
                if gv[0, x] == 0.0:
                    for j in range(V):
                        S[x, j] = 0.0
        # Decay factors: EB = e^b on the queries and the write keys, Kd = K e^{b_C - b} for
        # the state update, EC = e^{b_C} on the state.
        if gate_kind == 2:
            for x in range(K):
                acc[x] = 1.0
            for i in range(m):
                for x in range(K):
                    acc[x] *= gv[i, x]
                    EB[i, x] = acc[x]
            for x in range(K):
                EC[x] = acc[x]
                acc[x] = 1.0
            for i in range(m - 1, -1, -1):
                for x in range(K):
                    Kd[i, x] = Kc[i, x] * acc[x]
                    acc[x] *= gv[i, x]
            _vector_scores(Qc, Kc, gv, Msc, m, False, E, w)
        else:
            _scalar_decays(gs, m, Gam, gam, tail)
            _abt(Qc, Kc, Msc, m, m, BT)
            for i in range(m):
                # Select, not multiply: q_i . k_s of a later row s may be NaN.
                for s in range(m):
                    Msc[i, s] = Msc[i, s] * Gam[i, s] if s <= i else 0.0
                for x in range(K):
                    Kd[i, x] = Kc[i, x] * tail[i]
                    EB[i, x] = gam[i]
            for x in range(K):
                EC[x] = gam[m - 1]
        # Pseudo-values U'.
        for i in range(m):
            for j in range(V):
                U[i, j] = 0.0
                O[i, j] = 0.0
        if erase:
            if gate_kind == 2:
                _vector_scores(Kc, Kc, gv, Aa, m, True, E, w)
            else:
                _abt(Kc, Kc, Aa, m, m, BT)
                for i in range(m):
                    for s in range(m):
                        Aa[i, s] = Aa[i, s] * Gam[i, s] if s < i else 0.0
            for i in range(m):
                for s in range(i):
                    Aa[i, s] *= bet[i]
                for x in range(K):
                    X[i, x] = bet[i] * Kc[i, x] * EB[i, x]
                vr = row(v, b, rb + r0 + i, hv, 0)
                for j in range(V):
                    X[i, K + j] = bet[i] * vr[j]
            _solve_unit_lower(Aa, X, m)
            for i in range(m):
                for j in range(V):
                    U[i, j] = X[i, K + j]
            # U' = U - W S with W = X[:, :K]
            _ab_acc(X, S, U, m, K, -1.0)
        else:
            for i in range(m):
                vr = row(v, b, rb + r0 + i, hv, 0)
                for j in range(V):
                    U[i, j] = vr[j]
        # O = (Q * e^b) S + tril(scores) U'
        for i in range(m):
            for x in range(K):
                Qc[i, x] *= EB[i, x]
        _ab_acc(Qc, S, O, m, K, 1.0)
        _tril_ab_acc(Msc, U, O, m)
        for i in range(m):
            r = r0 + i
            tt = r // n_sub
            if r - tt * n_sub == n_sub - 1:
                orow = row(o, b, t0 + tt, hv, 0)
                for j in range(V):
                    orow[j] = O[i, j]
        # S <- Diag(e^{b_C}) S + Kd^T U'
        for x in range(K):
            f = EC[x]
            for j in range(V):
                S[x, j] *= f
        _atb_acc(Kd, U, S, m)
        r0 += m
    if write_state:
        for i in range(K):
            dst = row(state_out, out_row, hv, i, 0)
            for j in range(V):
                dst[j] = S[i, j]


@jit(parallel=True)
def chunk_kernel(
    q: Array,
    k: Array,
    v: Array,
    gate: Array,
    beta: Array,
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
    n_sub: int,
    G: int,
    gate_kind: int,
    erase: bool,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
    C: int,
) -> None:
    """Every (sequence, value head) task of a call in the chunk form, in parallel.

    Arguments as :func:`.recurrent.recurrent_kernel` (one task per sequence and head);
    ``C`` is the requested chunk size, run as ``min(C, MAX_CHUNK, longest sequence in rows)``.
    """
    longest = 0
    for s in range(seq_t0.shape[0]):
        longest = max(longest, (seq_t1[s] - seq_t0[s]) * n_sub)
    Ce = max(1, min(C, MAX_CHUNK, longest))
    for task in prange(task_seq.shape[0]):
        s = task_seq[task]
        _chunk_task(
            q, k, v, gate, beta, state_in, in_rows[s], state_out, out_rows[s], o,
            seq_b[s], seq_t0[s], seq_t1[s], task_hv[task], n_sub, G, gate_kind, erase,
            has_init, write_state, l2norm, scale, Ce,
        )  # fmt: skip
