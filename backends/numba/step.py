"""Decoding: one token per call, the state pool updated in place through ``state_indices``.

A step touches every state element twice at most, so it is bound by memory traffic: the
kernel works directly on the pool rows (no private copy of the state), one block of ``VB``
value columns at a time, so the second pass finds the block in L1. Per (sequence, value head)
and delta step ``j`` of the token (``n`` steps for DeltaProduct, decay ``a`` before the
first, output after the last)::

    pk = (a S)^T k,  pq = (a S)^T q~          read pass (pq only at the last step)
    u  = beta (v - pk)                         Hebbian family: u = v
    S  = Diag(a) S + k u^T                     update pass
    o  = pq + (k . q~) u

The Hebbian family needs no read before the write: one pass updates ``S`` and reads
``S^T q~``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from fastweights.backends import L2NORM_EPS

from ._jit import jit, prefer_512, row
from ._math import exp_f32, exp_f64
from ._passes import VB

Array = Any
_pass = jit(nrt=False, noalias=True)


@_pass
def _read(
    pool: Array,
    n: int,
    hv: int,
    j0: int,
    nv: int,
    a: Array,
    ka: Array,
    qa: Array,
    pk: Array,
    pq: Array,
) -> None:
    """``pk = S^T ka``, ``pq = S^T qa`` over columns ``j0 .. j0+nv`` of ``pool[n, hv]``
    (``ka = a k``, ``qa = a q``); rows whose decay ``a`` is 0 are reset and not read."""
    prefer_512()
    for j in range(VB):
        pk[j] = 0.0
        pq[j] = 0.0
    K = ka.shape[0]
    if nv == VB:
        for i in range(K):
            if a[i] == 0.0:
                continue
            p = row(pool, n, hv, i, j0)
            b = ka[i]
            c = qa[i]
            for j in range(VB):
                s = p[j]
                pk[j] += b * s
                pq[j] += c * s
    else:
        for i in range(K):
            if a[i] == 0.0:
                continue
            p = row(pool, n, hv, i, j0)
            b = ka[i]
            c = qa[i]
            for j in range(nv):
                s = p[j]
                pk[j] += b * s
                pq[j] += c * s


@_pass
def _update(
    pool: Array,
    n: int,
    hv: int,
    j0: int,
    nv: int,
    a: Array,
    kw: Array,
    w: Array,
    qa: Array,
    pq: Array,
) -> None:
    """``S = Diag(a) S + kw w^T`` on the columns ``j0 .. j0+nv``; then ``pq = S^T qa``.

    A row whose decay is 0 (a hard reset) drops its old values, even NaN or Inf."""
    prefer_512()
    for j in range(VB):
        pq[j] = 0.0
    K = kw.shape[0]
    if nv == VB:
        for i in range(K):
            p = row(pool, n, hv, i, j0)
            r = a[i]
            b = kw[i]
            c = qa[i]
            if r == 0.0:
                for j in range(VB):
                    s = b * w[j]
                    p[j] = s
                    pq[j] += c * s
                continue
            for j in range(VB):
                s = r * p[j] + b * w[j]
                p[j] = s
                pq[j] += c * s
    else:
        for i in range(K):
            p = row(pool, n, hv, i, j0)
            r = a[i]
            b = kw[i]
            c = qa[i]
            if r == 0.0:
                for j in range(nv):
                    s = b * w[j]
                    p[j] = s
                    pq[j] += c * s
                continue
            for j in range(nv):
                s = r * p[j] + b * w[j]
                p[j] = s
                pq[j] += c * s


@jit(nrt=False, reduce=True)
def _prepare(
    q: Array,
    k: Array,
    gate: Array,
    b: int,
    h: int,
    hv: int,
    n_sub: int,
    gate_kind: int,
    l2norm: bool,
    scale: float,
    KN: Array,
    QN: Array,
    QA: Array,
    A: Array,
    KA: Array,
    KQ: Array,
    red: Array,
) -> None:
    """Per delta step ``j``: ``KN[j] = k``, decay ``A[j]`` (ones after the first),
    ``KA[j] = A[j] k``; ``QN = q~``, ``QA = A[n-1] q~`` and ``KQ = k . q~`` of the last step."""
    K = KN.shape[1]
    for j in range(n_sub):
        kr = row(k, b, j, h, 0)
        ss = 0.0
        for x in range(K):
            KN[j, x] = kr[x]
            ss += KN[j, x] * KN[j, x]
        if l2norm:
            f = 1.0 / np.sqrt(ss + L2NORM_EPS)
            for x in range(K):
                KN[j, x] = KN[j, x] * f
        for x in range(K):
            A[j, x] = 1.0
    if gate_kind == 1:
        a = np.exp(gate[b, 0, hv, 0])
        for x in range(K):
            A[0, x] = a
    elif gate_kind == 2:
        g = row(gate, b, 0, hv, 0)
        if A.itemsize == 4:
            exp_f32(g, A[0], A[0].view(np.int32), red)
        else:
            exp_f64(g, A[0], A[0].view(np.int64), red)
    for j in range(n_sub):
        for x in range(K):
            KA[j, x] = A[j, x] * KN[j, x]
    qr = row(q, b, 0, h, 0)
    ss = 0.0
    for x in range(K):
        ss += qr[x] * qr[x]
    f = scale / np.sqrt(ss + L2NORM_EPS) if l2norm else scale
    kq = 0.0
    for x in range(K):
        QN[x] = qr[x] * f
        QA[x] = A[n_sub - 1, x] * QN[x]
        kq += KN[n_sub - 1, x] * QN[x]
    KQ[0] = kq


@jit()
def _step_task(
    q: Array,
    k: Array,
    v: Array,
    gate: Array,
    beta: Array,
    pool: Array,
    n: int,
    o: Array,
    b: int,
    hv: int,
    vb0: int,
    vb1: int,
    n_sub: int,
    G: int,
    gate_kind: int,
    erase: bool,
    beta_per_value: bool,
    l2norm: bool,
    scale: float,
) -> None:
    dt = o.dtype
    K = k.shape[3]
    V = v.shape[3]
    h = hv // G
    m = n_sub * K
    buf = np.zeros(3 * m + 4 * K + 3 * VB + 1, dt)
    KN = buf[:m].reshape((n_sub, K))
    A = buf[m : 2 * m].reshape((n_sub, K))
    KA = buf[2 * m : 3 * m].reshape((n_sub, K))
    QN = buf[3 * m : 3 * m + K]
    QA = buf[3 * m + K : 3 * m + 2 * K]
    Z = buf[3 * m + 2 * K : 3 * m + 3 * K]
    red = buf[3 * m + 3 * K : 3 * m + 4 * K]
    e = 3 * m + 4 * K
    pk = buf[e : e + VB]
    pq = buf[e + VB : e + 2 * VB]
    w = buf[e + 2 * VB : e + 3 * VB]
    KQ = buf[e + 3 * VB :]
    _prepare(q, k, gate, b, h, hv, n_sub, gate_kind, l2norm, scale, KN, QN, QA, A, KA, KQ, red)
    for x in range(vb0, vb1):
        j0 = x * VB
        nv = min(VB, V - j0)
        for j in range(n_sub):
            last = j == n_sub - 1
            vr = row(v, b, j, hv, j0)
            if erase:
                _read(pool, n, hv, j0, nv, A[j], KA[j], QA if last else Z, pk, pq)
                if beta_per_value:
                    br = row(beta, b, j, hv, j0)
                    for c in range(nv):
                        w[c] = br[c] * (vr[c] - pk[c])
                else:
                    bb = beta[b, j, hv, 0]
                    for c in range(nv):
                        w[c] = bb * (vr[c] - pk[c])
                _update(pool, n, hv, j0, nv, A[j], KN[j], w, Z, pk)
                if last:
                    orow = row(o, b, 0, hv, j0)
                    for c in range(nv):
                        orow[c] = pq[c] + KQ[0] * w[c]
            else:
                for c in range(nv):
                    w[c] = vr[c]
                _update(pool, n, hv, j0, nv, A[j], KN[j], w, QN if last else Z, pq)
                if last:
                    orow = row(o, b, 0, hv, j0)
                    for c in range(nv):
                        orow[c] = pq[c]


@jit(parallel=True)
def step_kernel(
    q: Array,
    k: Array,
    v: Array,
    gate: Array,
    beta: Array,
    pool: Array,
    rows: Array,
    o: Array,
    task_seq: Array,
    task_hv: Array,
    task_vb0: Array,
    task_vb1: Array,
    n_sub: int,
    G: int,
    gate_kind: int,
    erase: bool,
    beta_per_value: bool,
    l2norm: bool,
    scale: float,
) -> None:
    """One decoding step of every (row, value head, value blocks) task, in parallel.

    ``q [N, 1, H, K]``, ``k [N, n, H, K]``, ``v [N, n, HV, V]``, ``gate [N, 1, HV, 1 or K]``,
    ``beta [N, n, HV, 1 or V]``, the pool ``[P, HV, K, V]`` (row ``rows[i]`` for batch row
    ``i``, updated in place), ``o [N, 1, HV, V]``; all in one dtype, last axes contiguous.
    """
    for task in prange(task_seq.shape[0]):
        s = task_seq[task]
        _step_task(
            q, k, v, gate, beta, pool, rows[s], o, s, task_hv[task], task_vb0[task],
            task_vb1[task], n_sub, G, gate_kind, erase, beta_per_value, l2norm, scale,
        )  # fmt: skip
