"""The recurrent form: every op as the general rule, one fused pass over the state per step.

Per (sequence, value head) and step ``r`` (``n`` steps per token for DeltaProduct, the decay at
a token's first step, the read at its last)::

    S' = Diag(alpha_r) S                          alpha = exp(gate): none, per head, per key row
    u  = beta * (v_r - erase * S'^T k_r)          Hebbian family: u = v_r
    S  = S' + k_r u^T
    o  = S^T q~_t = S'^T q~_t + (k_r . q~_t) u    q~ = scale * q (l2-normalised first if asked)

The state is kept as ``Diag(c) S~`` with the running decay ``c = prod alpha`` (a float64 scalar
per head, or a vector per key row in the compute dtype) outside ``S~``: a step then costs
exactly one pass over ``S~`` that writes ``k/c u^T`` and accumulates ``S~^T (c k)`` and ``S~^T
(c q)`` for the next step (:mod:`._passes`). When some ``c`` falls below ``TINY`` (or is 0: a
``-inf`` gate is a hard reset) the pass also multiplies the rows by ``c`` and ``c`` restarts at
1.

Work is split into tasks (sequence, value head, range of value blocks) run in parallel with
``prange``; the per-step vectors (``k/c``, ``c k``, ``c q``, ``k . q``) are computed once per
chunk of ``TC`` steps for all the task's value blocks, and the passes of a chunk prefetch the
input rows of the next one (:func:`_prefetch_lines`). Each chunk's outputs are tested for
NaN/Inf while still in cache (:func:`_chunk_non_finite`); a non-finite one reruns the task with
the plain recurrence from the start (:func:`_task`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import prange

from fastweights.backends import L2NORM_EPS

from ._jit import address, jit, prefer_512, prefetch_at, row
from ._math import (
    decay_rows_reset_f32,
    decay_rows_reset_f64,
    decayed_f32,
    decayed_f64,
    reduce_rows_f32,
    reduce_rows_f64,
)
from ._passes import (
    VB,
    chunk_delta,
    chunk_delta2_direct,
    chunk_delta_direct,
    chunk_hebb,
    chunk_hebb_direct,
    gather_rows,
    pass_hebb_scaled,
    pass_load,
    pass_store,
    scatter_rows,
)

TC = 32
"""Steps whose per-step vectors are prepared together (the inner loop runs block by block)."""

TINY = 1e-18
"""Renormalise ``S~`` when a running decay ``c`` drops below this (or to 0)."""


CACHE_LINE = 64
"""Bytes per cache line: the kernel prefetches one address per line."""

Array = Any


@jit(nrt=False, reduce=True, noalias=True)
def _prepare(
    q: Array,
    k: Array,
    gate: Array,
    b: int,
    h: int,
    hv: int,
    t0: int,
    rb: int,
    r0: int,
    rc: int,
    n_sub: int,
    gate_kind: int,
    erase: bool,
    l2norm: bool,
    scale: float,
    c: Array,
    escr: Array,
    red: Array,
    cd: Array,
    KA: Array,
    KB: Array,
    QB: Array,
    RV: Array,
    RVF: Array,
    KQ: Array,
    CW: Array,
    CR: Array,
    sc: Array,
    tiny_c: float,
) -> None:
    """Per-step vectors of steps ``r0 .. r0+rc-1`` of one (sequence, value head), rows 1..rc.

    Per-key-row decays (``gate_kind == 2``, running decay ``cd``): ``KA = k / c`` (the write),
    ``KB = c k`` (only with ``erase``) and ``QB = c q~`` (the reads), ``CW = CR = 1``. No decay
    or one per head (running decay ``c[K]``): ``KA = k`` (``KB`` is left alone: the passes read
    with ``KA``), ``QB = q~``, and the decay scales the value-sized vectors instead, ``CR = c``
    for the reads and ``CW = 1 / c`` for the write. ``QB = 0`` where the step has no output;
    ``KQ = k . q~``. ``RVF`` flags the steps whose decay renormalises ``S~`` by ``RV`` (the
    running decay, which then restarts at 1) when it falls below ``tiny_c``. ``c`` is carried
    from chunk to chunk.
    """
    prefer_512()
    K = KA.shape[1]
    for i in range(1, rc + 1):
        r = r0 + i - 1
        tt = r // n_sub
        sub = r - tt * n_sub
        t = t0 + tt
        krow = row(k, b, rb + r, h, 0)
        for x in range(K):
            KA[i, x] = krow[x]
        if l2norm:
            ss = sc[2]
            for x in range(K):
                ss += KA[i, x] * KA[i, x]
            sc[0] = 1.0 / np.sqrt(ss + L2NORM_EPS)
            f = sc[0]
            for x in range(K):
                KA[i, x] = KA[i, x] * f
        kq = sc[2]
        if sub == n_sub - 1:
            qrow = row(q, b, t, h, 0)
            sc[0] = scale
            if l2norm:
                ss = sc[2]
                for x in range(K):
                    ss += qrow[x] * qrow[x]
                sc[0] = scale / np.sqrt(ss + L2NORM_EPS)
            f = sc[0]
            for x in range(K):
                QB[i, x] = qrow[x] * f
            for x in range(K):
                kq += KA[i, x] * QB[i, x]
        else:
            for x in range(K):
                QB[i, x] = 0.0
        KQ[i] = kq
        renorm = False
        if gate_kind == 2:
            # cd: the running decay per key row, in the compute dtype (as the plain
            # recurrence would round it).
            if sub == 0:
                grow = row(gate, b, t, hv, 0)
                if cd.itemsize == 4:
                    tiny = decay_rows_reset_f32(grow, cd, escr, red, tiny_c)
                else:
                    tiny = decay_rows_reset_f64(grow, cd, escr, red, tiny_c)
                if tiny:
                    renorm = True
                    for x in range(K):
                        RV[i, x] = cd[x]
                        cd[x] = 1.0
            if erase:
                for x in range(K):
                    cx = cd[x]
                    KB[i, x] = KA[i, x] * cx
                    QB[i, x] = QB[i, x] * cx
                    KA[i, x] = KA[i, x] / cx
            else:
                for x in range(K):
                    cx = cd[x]
                    QB[i, x] = QB[i, x] * cx
                    KA[i, x] = KA[i, x] / cx
        elif gate_kind == 1 and sub == 0:
            a = math.exp(np.float64(gate[b, t, hv, 0]))
            c[K] = 0.0 if a == 0.0 else c[K] * a  # 0: a hard reset, even from NaN
            if c[K] < tiny_c:
                renorm = True
                for x in range(K):
                    RV[i, x] = c[K]
                c[K] = 1.0
        CR[i] = c[K]
        CW[i] = 1.0 / c[K]
        RVF[i] = renorm


@jit(inline=True)
def _prepare_gk_rows(
    q: Array,
    k: Array,
    gate: Array,
    b: int,
    h: int,
    hv: int,
    t: int,
    rc: int,
    erase: bool,
    scale: float,
    c: Array,
    E: Array,
    RED: Array,
    cd: Array,
    KA: Array,
    KB: Array,
    QB: Array,
    RV: Array,
    RVF: Array,
    KQ: Array,
    CW: Array,
    CR: Array,
    sc: Array,
    tiny_c: float,
    DK: Array,
    DQ: Array,
    K: int,
    per_step: bool,
) -> None:
    """The body of :func:`_prepare_gk` for ``K`` key rows; ``K`` and ``per_step`` are
    constants at each call."""
    sc[0] = scale
    f = sc[0]
    # The test c < tiny_c in the compute dtype (a float64 comparison kept the loop at half
    # width): the smallest value of the dtype >= tiny_c gives the same answer for every c.
    sc[1] = tiny_c
    if sc[1] < tiny_c:
        sc[1] = np.nextafter(sc[1], sc[1] + sc[1])
    thr = sc[1]
    # per_step: each step reduces its own gates into row 0 of E, RED (a loop of constant
    # length: 512 bytes of scratch at K=64 instead of 16 KiB that evicted other rows from L1).
    # E's integer view only in its dtype's branch: the other view may not exist (odd K).
    if not per_step:
        if cd.itemsize == 4:
            bits32 = E.view(np.int32)
            for i in range(rc):
                reduce_rows_f32(row(gate, b, t + i, hv, 0), bits32, RED, i)
        else:
            bits64 = E.view(np.int64)
            for i in range(rc):
                reduce_rows_f64(row(gate, b, t + i, hv, 0), bits64, RED, i)
    for i in range(1, rc + 1):
        krow = row(k, b, t + i - 1, h, 0)
        qrow = row(q, b, t + i - 1, h, 0)
        grow = row(gate, b, t + i - 1, hv, 0)
        o = i - 1
        if per_step:
            o = 0
            if cd.itemsize == 4:
                reduce_rows_f32(grow, E.view(np.int32), RED, 0)
            else:
                reduce_rows_f64(grow, E.view(np.int64), RED, 0)
        kq = sc[2]
        for x in range(K):
            kq += krow[x] * (qrow[x] * f)
        KQ[i] = kq
        tiny = False
        dk = sc[2]
        dq = sc[2]
        if cd.itemsize == 4:
            for x in range(K):
                cx = decayed_f32(cd[x], grow[x], RED[o, x], E[o, x])
                cd[x] = cx
                low = cx < thr
                tiny |= low
                kx = krow[x]
                qx = (qrow[x] * f) * cx
                QB[i, x] = qx
                # A step with a low c is redone below; 1 spares its division by 0 or tiny c.
                KA[i, x] = kx / (np.float32(1.0) if low else cx)
                if erase:
                    kb = kx * cx
                    KB[i, x] = kb
                    dk += KA[i - 1, x] * kb
                    dq += KA[i - 1, x] * qx
        else:
            for x in range(K):
                cx = decayed_f64(cd[x], grow[x], RED[o, x], E[o, x])
                cd[x] = cx
                low = cx < thr
                tiny |= low
                kx = krow[x]
                qx = (qrow[x] * f) * cx
                QB[i, x] = qx
                KA[i, x] = kx / (1.0 if low else cx)
                if erase:
                    kb = kx * cx
                    KB[i, x] = kb
                    dk += KA[i - 1, x] * kb
                    dq += KA[i - 1, x] * qx
        RVF[i] = tiny
        if tiny:
            # Renormalise: S~ takes the running decay (RV), which restarts at 1.
            for x in range(K):
                RV[i, x] = cd[x]
                cd[x] = 1.0
            for x in range(K):
                cx = cd[x]
                kx = krow[x]
                if erase:
                    KB[i, x] = kx * cx
                QB[i, x] = (qrow[x] * f) * cx
                KA[i, x] = kx / cx
            if erase:
                dk = sc[2]
                dq = sc[2]
                for x in range(K):
                    dk += KA[i - 1, x] * KB[i, x]
                    dq += KA[i - 1, x] * QB[i, x]
        DK[i] = dk  # KA[0]: the last write of the chunk before (0 at the start)
        DQ[i] = dq
        CR[i] = c[K]
        CW[i] = 1.0 / c[K]


@jit(nrt=False, reduce=True, noalias=True)
def _prepare_gk(
    q: Array,
    k: Array,
    gate: Array,
    b: int,
    h: int,
    hv: int,
    t: int,
    rc: int,
    erase: bool,
    scale: float,
    c: Array,
    E: Array,
    RED: Array,
    cd: Array,
    KA: Array,
    KB: Array,
    QB: Array,
    RV: Array,
    RVF: Array,
    KQ: Array,
    CW: Array,
    CR: Array,
    sc: Array,
    tiny_c: float,
    DK: Array,
    DQ: Array,
) -> None:
    """:func:`_prepare` for tokens ``t .. t+rc-1`` of an op with per-key-row decays, one step
    per token and no l2-normalisation (``gla``, ``kda``): the same values bit for bit, with
    the ``exp`` of the chunk's gates reduced in one loop (``E``, ``RED``: ``[TC, K]``
    scratch) and each step's decay, its renormalisation test and its vectors in one pass over
    the key rows. A step whose running decay falls below ``tiny_c`` (rare) redoes its
    vectors after the renormalisation. With ``erase``, also ``DK[i] = KA[i-1] . KB[i]`` and
    ``DQ[i] = KA[i-1] . QB[i]``: the corrections of the two-step sweeps
    (:func:`._passes.chunk_delta_direct`)."""
    prefer_512()
    K = KA.shape[1]
    # kda at K = 64: K a constant (the loops unroll) and the exp reduced step by step; gla
    # and other sizes take the general body, unchanged (a constant K may change the order
    # of the sums of k . q~ and the FMA contraction of the range reduction).
    if erase and K == 64:
        _prepare_gk_rows(
            q, k, gate, b, h, hv, t, rc, erase, scale, c, E, RED, cd, KA, KB, QB, RV, RVF, KQ,
            CW, CR, sc, tiny_c, DK, DQ, 64, True,
        )  # fmt: skip
    else:
        _prepare_gk_rows(
            q, k, gate, b, h, hv, t, rc, erase, scale, c, E, RED, cd, KA, KB, QB, RV, RVF, KQ,
            CW, CR, sc, tiny_c, DK, DQ, K, False,
        )  # fmt: skip


@jit(nrt=False)
def prefetch_capacity(K: int, cols: int, itemsize: int) -> int:
    """The most lines :func:`_prefetch_lines` lists for ``TC`` steps: per step the rows of
    ``k``, ``q`` and a per-key-row gate, of ``v``, ``o`` and a per-value beta (``cols`` value
    columns), and one line for a per-head beta."""
    line = max(1, CACHE_LINE // itemsize)
    return TC * (3 * -(-K // line) + 3 * -(-cols // line) + 1)


@jit(nrt=False)
def _prefetch_lines_1(
    q: Array,
    k: Array,
    v: Array,
    gate: Array,
    beta: Array,
    o: Array,
    b: int,
    h: int,
    hv: int,
    t: int,
    tr: int,
    rc: int,
    c0: int,
    c1: int,
    PFA: Array,
) -> int:
    """:func:`_prefetch_lines` for one step per token, tokens ``t .. t+rc-1`` (rows ``tr ..``
    of ``k``, ``v`` and ``beta``): the same addresses in the same order, from each input's
    first row and its stride between tokens (a few additions per line instead of a
    :func:`row` per line)."""
    if rc <= 0:
        return 0  # no rows (t may be one past the last token)
    line = CACHE_LINE
    it = v.itemsize
    nk = k.shape[3] * it
    nv = (c1 - c0) * it
    ka = address(row(k, b, tr, h, 0), 0)
    qa = address(row(q, b, t, h, 0), 0)
    va = address(row(v, b, tr, hv, c0), 0)
    oa = address(row(o, b, t, hv, c0), 0)
    ks, qs, vs, ost = k.strides[1], q.strides[1], v.strides[1], o.strides[1]
    nbv = 0  # bytes of beta per token: a per-value row, one line for a per-head one
    ba, bs = 0, 0
    if beta.shape[3] > 1:
        nbv = nv
        ba, bs = address(row(beta, b, tr, hv, c0), 0), beta.strides[1]
    elif beta.shape[1] > 1:
        nbv = 1
        ba, bs = address(row(beta, b, tr, hv, 0), 0), beta.strides[1]
    ng = 0
    ga, gs = 0, 0
    if gate.shape[1] > 1:
        ng = gate.shape[3] * it
        ga, gs = address(row(gate, b, t, hv, 0), 0), gate.strides[1]
    # Through a row pointer: PFA[n] with a signed n compiles to a wraparound test per store.
    P = row(PFA.reshape((1, 1, 1, PFA.shape[0])), 0, 0, 0, 0)
    n = 0
    for _ in range(rc):
        for x in range(0, nk, line):
            P[n] = ka + x
            n += 1
        for x in range(0, nv, line):
            P[n] = va + x
            n += 1
        for x in range(0, nk, line):
            P[n] = qa + x
            n += 1
        for x in range(0, nv, line):
            P[n] = oa + x
            n += 1
        for x in range(0, nbv, line):
            P[n] = ba + x
            n += 1
        for x in range(0, ng, line):
            P[n] = ga + x
            n += 1
        ka += ks
        qa += qs
        va += vs
        oa += ost
        ba += bs
        ga += gs
    return n


@jit(nrt=False)
def _prefetch_lines(
    q: Array,
    k: Array,
    v: Array,
    gate: Array,
    beta: Array,
    o: Array,
    b: int,
    h: int,
    hv: int,
    t0: int,
    rb: int,
    r0: int,
    rc: int,
    n_sub: int,
    c0: int,
    c1: int,
    PFA: Array,
) -> int:
    """Fill ``PFA`` with the addresses of the cache lines that steps ``r0 .. r0+rc-1`` read
    and write (value columns ``c0 .. c1``); returns how many (at most
    :func:`prefetch_capacity` for ``rc <= TC``).

    One head's rows sit ``H * K`` elements apart, a stride the hardware prefetchers do not
    follow across pages, so the kernel prefetches them itself, a chunk ahead.
    """
    if n_sub == 1:
        return _prefetch_lines_1(
            q, k, v, gate, beta, o, b, h, hv, t0 + r0, rb + r0, rc, c0, c1, PFA
        )  # fmt: skip
    K = k.shape[3]
    step = max(1, CACHE_LINE // v.itemsize)
    n = 0
    for i in range(rc):
        r = r0 + i
        tt = r // n_sub
        t = t0 + tt
        kp = row(k, b, rb + r, h, 0)
        vp = row(v, b, rb + r, hv, c0)
        for x in range(0, K, step):
            PFA[n] = address(kp, x)
            n += 1
        for x in range(0, c1 - c0, step):
            PFA[n] = address(vp, x)
            n += 1
        if r - tt * n_sub == n_sub - 1:
            qp = row(q, b, t, h, 0)
            op = row(o, b, t, hv, c0)
            for x in range(0, K, step):
                PFA[n] = address(qp, x)
                n += 1
            for x in range(0, c1 - c0, step):
                PFA[n] = address(op, x)
                n += 1
        if beta.shape[3] > 1:
            bp = row(beta, b, rb + r, hv, c0)
            for x in range(0, c1 - c0, step):
                PFA[n] = address(bp, x)
                n += 1
        elif beta.shape[1] > 1:
            PFA[n] = address(row(beta, b, rb + r, hv, 0), 0)
            n += 1
        if gate.shape[1] > 1 and r - tt * n_sub == 0:
            gp = row(gate, b, t, hv, 0)
            for x in range(0, gate.shape[3], step):
                PFA[n] = address(gp, x)
                n += 1
    return n


@jit(nrt=False, noalias=True)
def _advance_lines(PFA: Array, PADV: Array, n: int) -> None:
    """``PFA[:n] += PADV[:n]``: the prefetch list of the next chunk (see :func:`_sweep`)."""
    prefer_512()
    for x in range(n):
        PFA[x] += PADV[x]


@jit()
def _sweep(
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
    vb0: int,
    vb1: int,
    n_sub: int,
    G: int,
    gate_kind: int,
    erase: bool,
    beta_per_value: bool,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
    tiny_c: float,
    check: bool,
) -> int:
    """One (sequence, value head, value blocks ``vb0 .. vb1-1``) from start to end, the
    running decay renormalised below ``tiny_c``.

    With ``check``, the outputs of each chunk are tested for NaN/Inf while they are still in
    cache; the sweep stops at the first chunk that has one and returns its first non-finite
    token (the state is then not written). Returns ``t1`` otherwise.

    Per-step vectors live in rows ``1 .. TC`` of ``KA, KB, QB, RV`` (row 0 of ``KA``: the
    previous step's write); ``VC``/``BC``/``OC`` hold one block's values, betas and outputs
    for a chunk.
    """
    dt = v.dtype
    K = k.shape[3]
    V = v.shape[3]
    h = hv // G
    nb = vb1 - vb0
    R = (t1 - t0) * n_sub
    rb = t0 * n_sub
    # Scratch, carved from one allocation.
    n1 = TC + 1
    sizes = (nb * K * VB, 3 * nb * VB, 4 * n1 * K, 5 * n1, 3 * TC * VB, K + TC + 3)
    buf = np.empty(sum(sizes), dt)
    o0 = sizes[0]
    Sb = buf[:o0].reshape((nb, K, VB))
    W = buf[o0 : o0 + nb * VB].reshape((nb, VB))
    PK = buf[o0 + nb * VB : o0 + 2 * nb * VB].reshape((nb, VB))
    PQ = buf[o0 + 2 * nb * VB : o0 + 3 * nb * VB].reshape((nb, VB))
    o0 += sizes[1]
    KA = buf[o0 : o0 + n1 * K].reshape((n1, K))
    KBv = buf[o0 + n1 * K : o0 + 2 * n1 * K].reshape((n1, K))
    KB = KBv if gate_kind == 2 else KA  # the read keys: k itself unless per-row decays
    QB = buf[o0 + 2 * n1 * K : o0 + 3 * n1 * K].reshape((n1, K))
    RV = buf[o0 + 3 * n1 * K : o0 + 4 * n1 * K].reshape((n1, K))
    o0 += sizes[2]
    KQ = buf[o0 : o0 + n1]
    CW = buf[o0 + n1 : o0 + 2 * n1]
    CR = buf[o0 + 2 * n1 : o0 + 3 * n1]
    DK = buf[o0 + 3 * n1 : o0 + 4 * n1]
    DQ = buf[o0 + 4 * n1 : o0 + 5 * n1]
    o0 += sizes[3]
    VC = buf[o0 : o0 + TC * VB].reshape((TC, VB))
    BC = buf[o0 + TC * VB : o0 + 2 * TC * VB].reshape((TC, VB))
    OC = buf[o0 + 2 * TC * VB : o0 + 3 * TC * VB].reshape((TC, VB))
    o0 += sizes[4]
    cd = buf[o0 : o0 + K]
    BS = buf[o0 + K : o0 + K + TC]
    sc = buf[o0 + K + TC : o0 + K + TC + 3]
    # The second write and reads of a two-step pass (pass_hebb2, pass_delta22).
    W2 = np.empty(VB, dt)
    PQ2 = np.empty(VB, dt)
    PK1 = np.empty(VB, dt)  # the reads of a two-step pass (chunk_delta2_direct)
    PQ1 = np.empty(VB, dt)
    PK2 = np.empty(VB, dt)
    escr = np.empty(TC * K, dt)  # scratch of the per-key-row exp
    red = np.empty(TC * K, dt)
    E2 = escr.reshape((TC, K))
    RED2 = red.reshape((TC, K))
    RVF = np.zeros(n1, np.bool_)
    c0 = vb0 * VB
    c1 = min(vb1 * VB, V)
    PFA = np.empty(prefetch_capacity(K, c1 - c0, v.itemsize), np.int64)
    c = np.ones(K + 1, np.float64)
    # Finiteness of the outputs so far: FIN[j] += o * 0 stays 0 while every o is finite.
    FIN = np.zeros(max(c1 - c0, 1), dt)
    # Per-key-row decays, one step per token: the vectors of a chunk in _prepare_gk, and
    # kda's steps two per sweep (chunk_delta_direct, with _prepare_gk's DK and DQ).
    fused_gk = gate_kind == 2 and n_sub == 1 and not l2norm
    two = fused_gk and erase
    cd[:] = 1.0
    KBv[:] = 0.0
    W[:] = 0.0
    KA[0] = 0.0
    sc[:] = 0.0  # sc[2] stays 0: a zero of the compute dtype to start sums from
    # Full blocks of an initial state are loaded by the first pass (pass_load); the others
    # are copied here, zero-padded, and read by a regular first pass.
    for x in range(nb):
        j0 = (vb0 + x) * VB
        nv = min(VB, V - j0)
        if has_init and nv == VB and R > 0:
            continue
        Sb[x] = 0.0
        PK[x] = 0.0
        PQ[x] = 0.0
        if has_init:
            for i in range(K):
                src = row(state_in, in_row, hv, i, j0)
                for j in range(nv):
                    Sb[x, i, j] = src[j]
    n = _prefetch_lines(
        q, k, v, gate, beta, o, b, h, hv, t0, rb, 0, min(TC, R), n_sub, c0, c1, PFA
    )  # fmt: skip
    for x in range(n):
        prefetch_at(PFA[x])
    # One step per token and three chunks or more: the list of a chunk's lines is the
    # previous chunk's plus a fixed advance per line (PADV, from the lists of chunks 1 and
    # 2), a vector addition instead of a new list (_prefetch_lines took about 18 ns per token
    # at K=V=64). A shorter last chunk lists a prefix: its tokens, in the same order.
    adv = n_sub == 1 and R >= 3 * TC
    PADV = np.empty(PFA.shape[0] if adv else 0, np.int64)
    nfull = 0
    if adv:
        nfull = _prefetch_lines(
            q, k, v, gate, beta, o, b, h, hv, t0, rb, 2 * TC, TC, n_sub, c0, c1, PADV
        )  # fmt: skip
        _prefetch_lines(q, k, v, gate, beta, o, b, h, hv, t0, rb, TC, TC, n_sub, c0, c1, PFA)
        for x in range(nfull):
            PADV[x] -= PFA[x]
    for r0 in range(0, R, TC):
        rc = min(TC, R - r0)
        # The passes of this chunk prefetch the next one's lines, `per` at each pass.
        n = 0
        if r0 + TC < R:
            if adv:
                if r0 > 0:
                    _advance_lines(PFA, PADV, nfull)
                n = min(TC, R - r0 - TC) * (nfull // TC)
            else:
                n = _prefetch_lines(
                    q, k, v, gate, beta, o, b, h, hv, t0, rb, r0 + TC, min(TC, R - r0 - TC),
                    n_sub, c0, c1, PFA,
                )  # fmt: skip
        lines = PFA[:n]
        per = -(-n // (rc * nb))
        if fused_gk:
            _prepare_gk(
                q, k, gate, b, h, hv, t0 + r0, rc, erase, scale, c, E2, RED2, cd, KA, KBv,
                QB, RV, RVF, KQ, CW, CR, sc, tiny_c, DK, DQ,
            )  # fmt: skip
        else:
            _prepare(
                q, k, gate, b, h, hv, t0, rb, r0, rc, n_sub, gate_kind, erase, l2norm, scale,
                c, escr, red, cd, KA, KBv, QB, RV, RVF, KQ, CW, CR, sc, tiny_c,
            )  # fmt: skip
        if erase and not beta_per_value:
            for i in range(rc):
                BS[i] = beta[b, rb + r0 + i, hv, 0]
        for x in range(nb):
            j0 = (vb0 + x) * VB
            nv = min(VB, V - j0)
            if r0 == 0 and has_init and nv == VB:
                pass_load(Sb, x, state_in, in_row, hv, j0, RV, RVF[1], KB, QB, PK, PQ)
            # Step 0 needs no pass of its own after pass_load or from a zero state.
            i0 = 1 if r0 == 0 and not (has_init and nv < VB) else 0
            if nv == VB and n_sub == 1:
                # A full block of an op with one step per token: v in, o out, no copies.
                if two:
                    chunk_delta2_direct(
                        Sb, x, W, PK, PQ, KA, KB, QB, RV, RVF, KQ, CW, CR, v, beta, BS,
                        beta_per_value, o, b, rb + r0, hv, j0, i0, rc, lines, x * rc * per, per,
                        W2, PK1, PQ1, PK2, PQ2, DK, DQ,
                    )  # fmt: skip
                elif erase:
                    chunk_delta_direct(
                        Sb, x, W, PK, PQ, KA, KB, QB, RV, RVF, KQ, CW, CR, v, beta, BS,
                        beta_per_value, o, b, rb + r0, hv, j0, i0, rc, lines, x * rc * per, per,
                    )  # fmt: skip
                else:
                    chunk_hebb_direct(
                        Sb, x, W, PQ, KA, QB, RV, RVF, KQ, CW, CR, v, o, b, rb + r0, hv, j0,
                        i0, rc, lines, x * rc * per, per, W2, PQ2,
                    )  # fmt: skip
                continue
            gather_rows(v, b, rb + r0, hv, j0, nv, rc, VC)
            if erase:
                if beta_per_value:
                    gather_rows(beta, b, rb + r0, hv, j0, nv, rc, BC)
                chunk_delta(
                    Sb, x, W, PK, PQ, KA, KB, QB, RV, RVF, KQ, CW, CR, VC, BS, BC,
                    beta_per_value, OC, i0, rc, lines, x * rc * per, per,
                )  # fmt: skip
            else:
                chunk_hebb(
                    Sb, x, W, PQ, KA, QB, RV, RVF, KQ, CW, CR, VC, OC, i0, rc, lines,
                    x * rc * per, per,
                )  # fmt: skip
            scatter_rows(OC, o, b, t0, hv, j0, nv, r0, rc, n_sub)
        KA[0] = KA[rc]
        if check:
            # The tokens whose last step is in this chunk, read back while in cache.
            tlo = t0 + r0 // n_sub
            thi = t0 + (r0 + rc) // n_sub
            if _chunk_non_finite(o, b, tlo, thi, hv, c0, c1, FIN):
                return _first_non_finite(o, b, tlo, thi, hv, c0, c1)
    if not write_state:
        return t1
    # The last write, with the running decay folded back into the state.
    for x in range(K):
        RV[1, x] = cd[x] if gate_kind == 2 else c[K]
        QB[1, x] = 0.0
    for x in range(nb):
        j0 = (vb0 + x) * VB
        nv = min(VB, V - j0)
        if R == 0:
            pass
        elif nv == VB:
            pass_store(Sb, x, W, KA, RV, state_out, out_row, hv, j0)
            continue
        else:
            pass_hebb_scaled(Sb, x, W, KA, RV, QB, 0, PQ, PFA, 0, 0)
        for i in range(K):
            dst = row(state_out, out_row, hv, i, j0)
            for j in range(nv):
                dst[j] = Sb[x, i, j]
    return t1


@jit(nrt=False)
def _chunk_non_finite(
    o: Array, b: int, t0: int, t1: int, hv: int, c0: int, c1: int, FIN: Array
) -> bool:
    """Whether some ``o[b, t, hv, c0:c1]`` so far (``t < t1``; earlier tokens through
    ``FIN``) is NaN or Inf: ``FIN[j] += o[b, t, hv, c0 + j] * 0`` column by column (vector
    code, no reduction in the loop), then one test of ``FIN``."""
    prefer_512()
    n = c1 - c0
    if t1 <= t0 or n <= 0:
        return False
    z = FIN[0] - FIN[0]  # 0 in FIN's dtype (FIN is all 0 until a non-finite output)
    for t in range(t0, t1):
        p = row(o, b, t, hv, c0)
        for j in range(n):
            FIN[j] += p[j] * z  # NaN iff p[j] is NaN or Inf (no fast-math nnan/ninf)
    bad = 0
    for j in range(n):
        bad += FIN[j] != z
    return bad > 0


@jit(nrt=False, reduce=True)
def _first_non_finite(o: Array, b: int, t0: int, t1: int, hv: int, c0: int, c1: int) -> int:
    """The first token of ``t0 .. t1-1`` with a NaN or Inf in ``o[b, t, hv, c0:c1]``, else
    ``t1``."""
    if t1 <= t0 or c1 <= c0:
        return t1  # nothing to read (and no o[0, 0, 0, 0] to take the zero from)
    z = o[0, 0, 0, 0] * 0.0
    for t in range(t0, t1):
        p = row(o, b, t, hv, c0)
        acc = z
        for j in range(c1 - c0):
            acc += p[j] * z  # NaN iff some p[j] is NaN or Inf (no fast-math nnan/ninf)
        if acc != z:
            return t
    return t1


@jit(nrt=False, reduce=True)
def _state_finite(state: Array, n: int, hv: int, c0: int, c1: int) -> bool:
    """Whether ``state[n, hv, :, c0:c1]`` is all finite."""
    if c1 <= c0 or state.shape[2] == 0:
        return True
    z = state[0, 0, 0, 0] * 0.0
    acc = z
    for i in range(state.shape[2]):
        p = row(state, n, hv, i, c0)
        for j in range(c1 - c0):
            acc += p[j] * z
    return acc == z


@jit()
def _task(
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
    vb0: int,
    vb1: int,
    n_sub: int,
    G: int,
    gate_kind: int,
    erase: bool,
    beta_per_value: bool,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
) -> None:
    """:func:`_sweep` with the running decay; again with every decay applied at once (the
    plain recurrence) from the first non-finite output, if a result is not finite.

    ``S~ = S / c`` can overflow where ``S`` does not (``|S|`` near the dtype's largest value
    times ``c``); it then shows as a non-finite output or final state. Non-finite inputs take
    the second sweep too, which gives the plain recurrence's NaN/Inf, causally.
    """
    bad = _sweep(
        q, k, v, gate, beta, state_in, in_row, state_out, out_row, o, b, t0, t1, hv, vb0, vb1,
        n_sub, G, gate_kind, erase, beta_per_value, has_init, write_state, l2norm, scale, TINY,
        True,
    )  # fmt: skip
    c0 = vb0 * VB
    c1 = min(vb1 * VB, v.shape[3])
    if bad == t1 and (not write_state or _state_finite(state_out, out_row, hv, c0, c1)):
        return
    # Outputs before the first non-finite one are kept bitwise (causality), the rest redone.
    keep = np.empty((bad - t0, c1 - c0), o.dtype)
    for t in range(t0, bad):
        keep[t - t0] = o[b, t, hv, c0:c1]
    _sweep(
        q, k, v, gate, beta, state_in, in_row, state_out, out_row, o, b, t0, t1, hv, vb0,
        vb1, n_sub, G, gate_kind, erase, beta_per_value, has_init, write_state, l2norm,
        scale, 1.0, False,
    )  # fmt: skip
    for t in range(t0, bad):
        o[b, t, hv, c0:c1] = keep[t - t0]


@jit(parallel=True)
def recurrent_kernel(
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
    task_vb0: Array,
    task_vb1: Array,
    n_sub: int,
    G: int,
    gate_kind: int,
    erase: bool,
    beta_per_value: bool,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
) -> None:
    """Run every task ``(sequence, value head, value blocks)`` of a call, in parallel.

    Arrays are in the caller's layout and the compute dtype: ``q [B, T, H, K]``,
    ``k [B, T*n, H, K]``, ``v [B, T*n, HV, V]``, ``gate [B, T, HV, 1 or K]`` (log-decay),
    ``beta [B, T*n, HV, 1 or V]``, states ``[P, HV, K, V]`` (rows ``in_rows`` / ``out_rows``
    per sequence), ``o [B, T, HV, V]``. Sequence ``s`` is tokens ``seq_t0[s] .. seq_t1[s]-1``
    of batch row ``seq_b[s]``.
    """
    for task in prange(task_seq.shape[0]):
        s = task_seq[task]
        _task(
            q, k, v, gate, beta, state_in, in_rows[s], state_out, out_rows[s], o,
            seq_b[s], seq_t0[s], seq_t1[s], task_hv[task], task_vb0[task], task_vb1[task],
            n_sub, G, gate_kind, erase, beta_per_value, has_init, write_state, l2norm, scale,
        )  # fmt: skip
