"""The hot loops: one fused pass over a block of the state per step.

A task keeps its state blocks in ``Sb [nb, K, VB]`` (``VB`` value columns per block). The
head's true state is ``Diag(c) S`` with the running decay ``c`` kept outside the block
(SPEC.md section 3, last paragraph), so a step costs one write and the two reads of the next
step, fused in one pass over block ``x``::

    S <- Diag(r) (S + kw w^T)          # write of step t; r = 1 except when renormalising
    pk = S^T kr,  pq = S^T qr          # reads for step t+1 (kr = c k, qr = c q of step t+1)

with ``w = W[x]``, ``kw = KA[i]``, ``r = RV[i + 1]``, ``kr = KB[i + 1]``, ``qr = QB[i + 1]``
and the results in ``PK[x]``, ``PQ[x]``. Every column of the state is an independent
recurrence, so value blocks are exact.

``VB`` is a compile-time constant: the loop over a row's columns is fully unrolled into 512-bit
vectors and ``w``, ``pk``, ``pq`` stay in registers for the whole pass (3 FMAs per state
element, one load, one store). Arguments are indexed rather than sliced, since every array
view costs an atomic reference-count update. These functions are compiled with ``noalias``:
their array arguments must not overlap.

Each pass also issues the prefetches ``PFA[p0:p1]`` (addresses of cache lines that a later
chunk reads, see ``recurrent._prefetch_lines``), spread evenly over its rows: a burst of
prefetches for the whole chunk stalls on the core's few line-fill buffers (it took a fifth of
the time at K=V=128), while a few per pass overlap with the FMAs.
"""

from __future__ import annotations

from typing import Any

from ._jit import jit, prefer_512, prefetch, prefetch_at, row

pass_kernel = jit(nrt=False, noalias=True)

VB = 64
"""Value columns per state block: 64 float32 columns x 128 keys = 32 KiB, an L1-sized block."""

Array = Any


@jit(inline=True)
def _prefetch_row(PFA: Array, p: int, p1: int, m: int, nxt: int, every: int) -> tuple[int, int]:
    """In row ``m`` of a pass, issue the prefetch ``PFA[p]`` if it is due (one every ``every``
    rows, up to ``p1``); returns the next ``p`` and the row it is due at."""
    if m == nxt and p < p1:
        prefetch_at(PFA[p])
        return p + 1, nxt + every
    return p, nxt


@pass_kernel
def pass_delta(
    Sb: Array,
    x: int,
    W: Array,
    KA: Array,
    KB: Array,
    QB: Array,
    i: int,
    PK: Array,
    PQ: Array,
    PFA: Array,
    p0: int,
    p1: int,
) -> None:
    """``S += kw w^T``, then ``pk = S^T kr``, ``pq = S^T qr``; prefetches ``PFA[p0:p1]``."""
    prefer_512()
    for j in range(VB):
        PK[x, j] = 0.0
        PQ[x, j] = 0.0
    K = Sb.shape[1]
    p, every, nxt = p0, max(1, K // max(p1 - p0, 1)), 0
    for m in range(K):
        p, nxt = _prefetch_row(PFA, p, p1, m, nxt, every)
        a = KA[i, m]
        b = KB[i + 1, m]
        c = QB[i + 1, m]
        for j in range(VB):
            s = Sb[x, m, j] + a * W[x, j]
            Sb[x, m, j] = s
            PK[x, j] += b * s
            PQ[x, j] += c * s
    for r in range(p, p1):
        prefetch_at(PFA[r])


@pass_kernel
def pass_delta_scaled(
    Sb: Array,
    x: int,
    W: Array,
    KA: Array,
    RV: Array,
    KB: Array,
    QB: Array,
    i: int,
    PK: Array,
    PQ: Array,
    PFA: Array,
    p0: int,
    p1: int,
) -> None:
    """``S = Diag(rv) (S + kw w^T)``, then ``pk = S^T kr``, ``pq = S^T qr``; prefetches
    ``PFA[p0:p1]``. A row whose ``rv`` is 0 (a hard reset) becomes exactly 0, even from NaN."""
    prefer_512()
    for j in range(VB):
        PK[x, j] = 0.0
        PQ[x, j] = 0.0
    K = Sb.shape[1]
    p, every, nxt = p0, max(1, K // max(p1 - p0, 1)), 0
    for m in range(K):
        p, nxt = _prefetch_row(PFA, p, p1, m, nxt, every)
        a = KA[i, m]
        r = RV[i + 1, m]
        b = KB[i + 1, m]
        c = QB[i + 1, m]
        if r == 0.0:
            # A hard reset: the row is exactly zero, even if it held NaN or Inf.
            for j in range(VB):
                Sb[x, m, j] = 0.0
            continue
        for j in range(VB):
            s = r * (Sb[x, m, j] + a * W[x, j])
            Sb[x, m, j] = s
            PK[x, j] += b * s
            PQ[x, j] += c * s
    for r in range(p, p1):
        prefetch_at(PFA[r])


@pass_kernel
def pass_hebb(
    Sb: Array,
    x: int,
    W: Array,
    KA: Array,
    QB: Array,
    i: int,
    PQ: Array,
    PFA: Array,
    p0: int,
    p1: int,
) -> None:
    """``S += kw w^T``, then ``pq = S^T qr`` (no erase term: the Hebbian family); prefetches
    ``PFA[p0:p1]``."""
    prefer_512()
    for j in range(VB):
        PQ[x, j] = 0.0
    K = Sb.shape[1]
    p, every, nxt = p0, max(1, K // max(p1 - p0, 1)), 0
    for m in range(K):
        p, nxt = _prefetch_row(PFA, p, p1, m, nxt, every)
        a = KA[i, m]
        c = QB[i + 1, m]
        for j in range(VB):
            s = Sb[x, m, j] + a * W[x, j]
            Sb[x, m, j] = s
            PQ[x, j] += c * s
    for r in range(p, p1):
        prefetch_at(PFA[r])


@pass_kernel
def pass_hebb_scaled(
    Sb: Array,
    x: int,
    W: Array,
    KA: Array,
    RV: Array,
    QB: Array,
    i: int,
    PQ: Array,
    PFA: Array,
    p0: int,
    p1: int,
) -> None:
    """``S = Diag(rv) (S + kw w^T)``, then ``pq = S^T qr``; prefetches ``PFA[p0:p1]``.
    A row whose ``rv`` is 0 (a hard reset) becomes exactly 0, even from NaN."""
    prefer_512()
    for j in range(VB):
        PQ[x, j] = 0.0
    K = Sb.shape[1]
    p, every, nxt = p0, max(1, K // max(p1 - p0, 1)), 0
    for m in range(K):
        p, nxt = _prefetch_row(PFA, p, p1, m, nxt, every)
        a = KA[i, m]
        r = RV[i + 1, m]
        c = QB[i + 1, m]
        if r == 0.0:
            for j in range(VB):
                Sb[x, m, j] = 0.0
            continue
        for j in range(VB):
            s = r * (Sb[x, m, j] + a * W[x, j])
            Sb[x, m, j] = s
            PQ[x, j] += c * s
    for r in range(p, p1):
        prefetch_at(PFA[r])


@pass_kernel
def pass_load(
    Sb: Array,
    x: int,
    src: Array,
    n: int,
    hv: int,
    j0: int,
    RV: Array,
    scaled: bool,
    KB: Array,
    QB: Array,
    PK: Array,
    PQ: Array,
) -> None:
    """Load block ``x`` from a state ``src[n, hv, :, j0 : j0 + VB]`` and read it for step 0.

    ``S = Diag(rv) src`` (``rv = RV[1]`` if ``scaled``), ``pk = S^T KB[1]``,
    ``pq = S^T QB[1]``: the first pass of a sequence, fused with the copy of the state.
    """
    prefer_512()
    for j in range(VB):
        PK[x, j] = 0.0
        PQ[x, j] = 0.0
    K = Sb.shape[1]
    for i in range(K):
        ahead = row(src, n, hv, min(i + 8, K - 1), j0)
        for j in range(0, VB, 64 // src.itemsize):
            prefetch(ahead, j)
        p = row(src, n, hv, i, j0)
        r = RV[1, i] if scaled else 1.0
        b = KB[1, i]
        c = QB[1, i]
        if r == 0.0:
            for j in range(VB):
                Sb[x, i, j] = 0.0
            continue
        for j in range(VB):
            s = r * p[j]
            Sb[x, i, j] = s
            PK[x, j] += b * s
            PQ[x, j] += c * s


@pass_kernel
def pass_store(
    Sb: Array, x: int, W: Array, KA: Array, RV: Array, dst: Array, n: int, hv: int, j0: int
) -> None:
    """``dst[n, hv, :, j0 : j0 + VB] = Diag(RV[1]) (S + KA[0] w^T)``: the last write of a
    sequence, with the running decay folded in, stored straight into the state."""
    prefer_512()
    for i in range(Sb.shape[1]):
        p = row(dst, n, hv, i, j0)
        a = KA[0, i]
        r = RV[1, i]
        for j in range(VB):
            p[j] = r * (Sb[x, i, j] + a * W[x, j])


@jit(inline=True)
def _lines(PFA: Array, pf0: int, per: int, i: int) -> tuple[int, int]:
    """The range of ``PFA`` that step ``i`` of a chunk prefetches."""
    n = PFA.shape[0]
    p0 = min(pf0 + i * per, n)
    return p0, min(p0 + per, n)


@pass_kernel
def chunk_delta(
    Sb: Array,
    x: int,
    W: Array,
    PK: Array,
    PQ: Array,
    KA: Array,
    KB: Array,
    QB: Array,
    RV: Array,
    RVF: Array,
    KQ: Array,
    CW: Array,
    CR: Array,
    VC: Array,
    BS: Array,
    BC: Array,
    per_value: bool,
    OC: Array,
    i0: int,
    rc: int,
    PFA: Array,
    pf0: int,
    per: int,
) -> None:
    """Steps ``0 .. rc-1`` of a chunk on block ``x``, delta family.

    Per step ``i``: the fused pass (write of the previous step, reads of this one), then
    ``u = beta (v - cr pk)`` (values ``VC[i]``, beta ``BC[i]`` if ``per_value`` else
    ``BS[i]``), ``o = cr pq + (k . q~) u`` into ``OC[i]`` and ``w = cw u`` for the next write
    (``cr``, ``cw``: a per-head decay). The passes of steps before ``i0`` were done by
    :func:`pass_load`. Step ``i`` prefetches ``per`` lines of ``PFA`` from ``pf0 + i per``.
    """
    prefer_512()
    for i in range(rc):
        p0, p1 = _lines(PFA, pf0, per, i)
        if i < i0:
            for r in range(p0, p1):
                prefetch_at(PFA[r])
        elif RVF[i + 1]:
            pass_delta_scaled(Sb, x, W, KA, RV, KB, QB, i, PK, PQ, PFA, p0, p1)
        else:
            pass_delta(Sb, x, W, KA, KB, QB, i, PK, PQ, PFA, p0, p1)
        kq = KQ[i + 1]
        cr = CR[i + 1]
        cw = CW[i + 1]
        if per_value:
            for j in range(VB):
                u = BC[i, j] * (VC[i, j] - cr * PK[x, j])
                OC[i, j] = cr * PQ[x, j] + kq * u
                W[x, j] = cw * u
        else:
            bs = BS[i]
            for j in range(VB):
                u = bs * (VC[i, j] - cr * PK[x, j])
                OC[i, j] = cr * PQ[x, j] + kq * u
                W[x, j] = cw * u


@pass_kernel
def chunk_delta_direct(
    Sb: Array,
    x: int,
    W: Array,
    PK: Array,
    PQ: Array,
    KA: Array,
    KB: Array,
    QB: Array,
    RV: Array,
    RVF: Array,
    KQ: Array,
    CW: Array,
    CR: Array,
    v: Array,
    beta: Array,
    BS: Array,
    per_value: bool,
    o: Array,
    b: int,
    r0: int,
    hv: int,
    j0: int,
    i0: int,
    rc: int,
    PFA: Array,
    pf0: int,
    per: int,
) -> None:
    """:func:`chunk_delta` reading ``v[b, r0 + i, hv, j0 : j0 + VB]`` (and a per-value
    ``beta``) and writing ``o`` in place: a full value block, one step per token.

    It saves the copies of :func:`gather_rows` and :func:`scatter_rows` (6 % of a step at
    K=V=64); ``v``, ``beta`` and ``o`` are read and written through :func:`row` pointers.
    """
    prefer_512()
    for i in range(rc):
        p0, p1 = _lines(PFA, pf0, per, i)
        if i < i0:
            for r in range(p0, p1):
                prefetch_at(PFA[r])
        elif RVF[i + 1]:
            pass_delta_scaled(Sb, x, W, KA, RV, KB, QB, i, PK, PQ, PFA, p0, p1)
        else:
            pass_delta(Sb, x, W, KA, KB, QB, i, PK, PQ, PFA, p0, p1)
        kq = KQ[i + 1]
        cr = CR[i + 1]
        cw = CW[i + 1]
        vr = row(v, b, r0 + i, hv, j0)
        orow = row(o, b, r0 + i, hv, j0)
        if per_value:
            br = row(beta, b, r0 + i, hv, j0)
            for j in range(VB):
                u = br[j] * (vr[j] - cr * PK[x, j])
                W[x, j] = cw * u
                orow[j] = cr * PQ[x, j] + kq * u
        else:
            bs = BS[i]
            for j in range(VB):
                u = bs * (vr[j] - cr * PK[x, j])
                W[x, j] = cw * u
                orow[j] = cr * PQ[x, j] + kq * u


@pass_kernel
def chunk_hebb(
    Sb: Array,
    x: int,
    W: Array,
    PQ: Array,
    KA: Array,
    QB: Array,
    RV: Array,
    RVF: Array,
    KQ: Array,
    CW: Array,
    CR: Array,
    VC: Array,
    OC: Array,
    i0: int,
    rc: int,
    PFA: Array,
    pf0: int,
    per: int,
) -> None:
    """Steps ``0 .. rc-1`` of a chunk on block ``x``, Hebbian family (``u = v``).

    The passes of steps before ``i0`` were done by :func:`pass_load`; prefetches as
    :func:`chunk_delta`."""
    prefer_512()
    for i in range(rc):
        p0, p1 = _lines(PFA, pf0, per, i)
        if i < i0:
            for r in range(p0, p1):
                prefetch_at(PFA[r])
        elif RVF[i + 1]:
            pass_hebb_scaled(Sb, x, W, KA, RV, QB, i, PQ, PFA, p0, p1)
        else:
            pass_hebb(Sb, x, W, KA, QB, i, PQ, PFA, p0, p1)
        kq = KQ[i + 1]
        cr = CR[i + 1]
        cw = CW[i + 1]
        for j in range(VB):
            u = VC[i, j]
            OC[i, j] = cr * PQ[x, j] + kq * u
            W[x, j] = cw * u


@pass_kernel
def chunk_hebb_direct(
    Sb: Array,
    x: int,
    W: Array,
    PQ: Array,
    KA: Array,
    QB: Array,
    RV: Array,
    RVF: Array,
    KQ: Array,
    CW: Array,
    CR: Array,
    v: Array,
    o: Array,
    b: int,
    r0: int,
    hv: int,
    j0: int,
    i0: int,
    rc: int,
    PFA: Array,
    pf0: int,
    per: int,
) -> None:
    """:func:`chunk_hebb` reading ``v`` and writing ``o`` in place (see
    :func:`chunk_delta_direct`)."""
    prefer_512()
    for i in range(rc):
        p0, p1 = _lines(PFA, pf0, per, i)
        if i < i0:
            for r in range(p0, p1):
                prefetch_at(PFA[r])
        elif RVF[i + 1]:
            pass_hebb_scaled(Sb, x, W, KA, RV, QB, i, PQ, PFA, p0, p1)
        else:
            pass_hebb(Sb, x, W, KA, QB, i, PQ, PFA, p0, p1)
        kq = KQ[i + 1]
        cr = CR[i + 1]
        cw = CW[i + 1]
        vr = row(v, b, r0 + i, hv, j0)
        orow = row(o, b, r0 + i, hv, j0)
        for j in range(VB):
            u = vr[j]
            W[x, j] = cw * u
            orow[j] = cr * PQ[x, j] + kq * u


@pass_kernel
def gather_rows(
    src: Array, b: int, row0: int, h: int, j0: int, nv: int, rc: int, dst: Array
) -> None:
    """``dst[i, :nv] = src[b, row0 + i, h, j0 : j0 + nv]`` for ``i < rc``, zero-padded."""
    for i in range(rc):
        s = row(src, b, row0 + i, h, j0)
        for j in range(nv):
            dst[i, j] = s[j]
        for j in range(nv, VB):
            dst[i, j] = 0.0


@pass_kernel
def scatter_rows(
    src: Array, dst: Array, b: int, t0: int, h: int, j0: int, nv: int, r0: int, rc: int, n: int
) -> None:
    """``dst[b, t0 + r // n, h, j0 : j0 + nv] = src[i, :nv]`` for the last step ``r`` of a token
    (``r = r0 + i``, ``i < rc``): the outputs of a chunk."""
    for i in range(rc):
        r = r0 + i
        tt = r // n
        if r - tt * n == n - 1:
            d = row(dst, b, t0 + tt, h, j0)
            for j in range(nv):
                d[j] = src[i, j]
