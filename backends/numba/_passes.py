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
inline_pass = jit(nrt=False, noalias=True, inline=True)
"""A pass inlined into its callers at numba's IR level: a call passes every field of every
array argument on the stack (about 40 pushes for :func:`pass_delta`, which LLVM did not inline
into the chunk loops)."""

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


@jit(inline=True)
def _row_delta(
    Sb: Array, x: int, m: int, W: Array, a: float, b: float, c: float, PK: Array, PQ: Array
) -> None:
    """Row ``m`` of :func:`pass_delta`: ``s = S[m] + a w``, ``pk += b s``, ``pq += c s``."""
    for j in range(VB):
        s = Sb[x, m, j] + a * W[x, j]
        Sb[x, m, j] = s
        PK[x, j] += b * s
        PQ[x, j] += c * s


@jit(inline=True)
def _row_delta_scaled(
    Sb: Array,
    x: int,
    m: int,
    W: Array,
    a: float,
    r: float,
    b: float,
    c: float,
    PK: Array,
    PQ: Array,
) -> None:
    """Row ``m`` of :func:`pass_delta_scaled` (a row whose ``r`` is 0 becomes exactly 0)."""
    if r == 0.0:
        # A hard reset: the row is exactly zero, even if it held NaN or Inf.
        for j in range(VB):
            Sb[x, m, j] = 0.0
        return
    for j in range(VB):
        s = r * (Sb[x, m, j] + a * W[x, j])
        Sb[x, m, j] = s
        PK[x, j] += b * s
        PQ[x, j] += c * s


@jit(inline=True)
def _row_hebb(Sb: Array, x: int, m: int, W: Array, a: float, c: float, PQ: Array) -> None:
    """Row ``m`` of :func:`pass_hebb`: ``s = S[m] + a w``, ``pq += c s``."""
    for j in range(VB):
        s = Sb[x, m, j] + a * W[x, j]
        Sb[x, m, j] = s
        PQ[x, j] += c * s


@jit(inline=True)
def _row_hebb_scaled(
    Sb: Array, x: int, m: int, W: Array, a: float, r: float, c: float, PQ: Array
) -> None:
    """Row ``m`` of :func:`pass_hebb_scaled` (a row whose ``r`` is 0 becomes exactly 0)."""
    if r == 0.0:
        for j in range(VB):
            Sb[x, m, j] = 0.0
        return
    for j in range(VB):
        s = r * (Sb[x, m, j] + a * W[x, j])
        Sb[x, m, j] = s
        PQ[x, j] += c * s


@jit(inline=True)
def _row_hebb2(
    Sb: Array,
    x: int,
    m: int,
    W: Array,
    W2: Array,
    a: float,
    a2: float,
    c: float,
    c2: float,
    PQ: Array,
    PQ2: Array,
) -> None:
    """Row ``m`` of :func:`pass_hebb2`: two steps of :func:`_row_hebb`, one load and one
    store of the row."""
    for j in range(VB):
        s = Sb[x, m, j] + a * W[x, j]
        PQ[x, j] += c * s
        s2 = s + a2 * W2[j]
        Sb[x, m, j] = s2
        PQ2[j] += c2 * s2


@inline_pass
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
    """``S += kw w^T``, then ``pk = S^T kr``, ``pq = S^T qr``; prefetches ``PFA[p0:p1]``,
    one in each of the first rows (one test per row, not a schedule's counters)."""
    prefer_512()
    for j in range(VB):
        PK[x, j] = 0.0
        PQ[x, j] = 0.0
    K = Sb.shape[1]
    npf = max(0, min(p1 - p0, K))
    for m in range(K):
        if m < npf:  # one prefetch in each of the first rows
            prefetch_at(PFA[p0 + m])
        _row_delta(Sb, x, m, W, KA[i, m], KB[i + 1, m], QB[i + 1, m], PK, PQ)
    for r in range(p0 + npf, p1):
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
    for r in range(p0, p1):
        prefetch_at(PFA[r])
    for m in range(K):
        _row_delta_scaled(
            Sb, x, m, W, KA[i, m], RV[i + 1, m], KB[i + 1, m], QB[i + 1, m], PK, PQ
        )  # fmt: skip


@jit(inline=True)
def _row_delta2(
    Sb: Array,
    x: int,
    m: int,
    WO: Array,
    W: Array,
    a0: float,
    a: float,
    b: float,
    c: float,
    b2: float,
    c2: float,
    PK: Array,
    PQ: Array,
    PK2: Array,
    PQ2: Array,
    nw: int,
    nr: int,
) -> None:
    """Row ``m`` of the two-step passes (:func:`pass_delta2`): ``s = S[m] + a0 wo + a w``
    (with ``nw == 2``; the writes in order, rounded as two passes round them), ``pk += b s``,
    ``pq += c s`` and, with ``nr == 2``, ``pk2 += b2 s``, ``pq2 += c2 s``. ``nw``, ``nr``
    are constants at every call (the branches fold)."""
    for j in range(VB):
        s = Sb[x, m, j]
        if nw == 2:
            s += a0 * WO[j]
        s += a * W[x, j]
        Sb[x, m, j] = s
        PK[j] += b * s
        PQ[j] += c * s
        if nr == 2:
            PK2[j] += b2 * s
            PQ2[j] += c2 * s


@jit(inline=True)
def pass_delta2(
    Sb: Array,
    x: int,
    WO: Array,
    W: Array,
    KA: Array,
    KB: Array,
    QB: Array,
    i: int,
    PK: Array,
    PQ: Array,
    PK2: Array,
    PQ2: Array,
    PFA: Array,
    p0: int,
    p1: int,
    nw: int,
    nr: int,
) -> None:
    """Up to two delta steps per sweep over block ``x``: the pending writes (``nw == 2``:
    ``S += KA[i-1] wo^T + KA[i] w^T``; else ``S += KA[i] w^T``), then the reads of step
    ``i+1``, ``pk, pq = S^T KB[i+1], S^T QB[i+1]``, and with ``nr == 2`` those of step
    ``i+2`` from the same ``S``, ``pk2, pq2 = S^T KB[i+2], S^T QB[i+2]``: taken before the
    write of step ``i+1``, which depends on ``pk``, so the caller adds
    ``(KA[i+1] . KB[i+2]) w1`` and ``(KA[i+1] . QB[i+2]) w1``. One load and one store per
    state element for two steps, 3 FMAs per element and step as :func:`pass_delta`.
    The accumulators are four separate 1-D arrays: with rows ``PK[x]`` of a 2-D array LLVM
    kept them in memory, a store per row. Prefetches ``PFA[p0:p1]`` as :func:`pass_delta`."""
    prefer_512()
    for j in range(VB):
        PK[j] = 0.0
        PQ[j] = 0.0
        if nr == 2:
            PK2[j] = 0.0
            PQ2[j] = 0.0
    K = Sb.shape[1]
    npf = max(0, min(p1 - p0, K))
    for m in range(K):
        if m < npf:  # one prefetch in each of the first rows
            prefetch_at(PFA[p0 + m])
        a0 = KA[i - 1, m] if nw == 2 else KA[i, m]
        b2 = KB[i + 2, m] if nr == 2 else KB[i + 1, m]
        c2 = QB[i + 2, m] if nr == 2 else QB[i + 1, m]
        _row_delta2(
            Sb, x, m, WO, W, a0, KA[i, m], KB[i + 1, m], QB[i + 1, m], b2, c2, PK, PQ, PK2,
            PQ2, nw, nr,
        )  # fmt: skip
    for r in range(p0 + npf, p1):
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
    ``PFA[p0:p1]`` as :func:`pass_delta`."""
    prefer_512()
    for j in range(VB):
        PQ[x, j] = 0.0
    K = Sb.shape[1]
    npf = max(0, min(p1 - p0, K))
    for m in range(K):
        if m < npf:  # one prefetch in each of the first rows
            prefetch_at(PFA[p0 + m])
        _row_hebb(Sb, x, m, W, KA[i, m], QB[i + 1, m], PQ)
    for r in range(p0 + npf, p1):
        prefetch_at(PFA[r])


@pass_kernel
def pass_hebb2(
    Sb: Array,
    x: int,
    W: Array,
    W2: Array,
    KA: Array,
    QB: Array,
    i: int,
    PQ: Array,
    PQ2: Array,
    PFA: Array,
    p0: int,
    p1: int,
) -> None:
    """Two steps of :func:`pass_hebb` in one sweep over the block: ``S += KA[i] w^T``,
    ``pq = S^T QB[i+1]``, ``S += KA[i+1] w2^T``, ``pq2 = S^T QB[i+2]``. The same operations
    in the same order (bit for bit), one load and one store per element instead of two; in
    the Hebbian family the second write ``w2`` is known before the pass. Prefetches
    ``PFA[p0:p1]`` as :func:`pass_delta`."""
    prefer_512()
    for j in range(VB):
        PQ[x, j] = 0.0
        PQ2[j] = 0.0
    K = Sb.shape[1]
    npf = max(0, min(p1 - p0, K))
    for m in range(K):
        if m < npf:  # one prefetch in each of the first rows
            prefetch_at(PFA[p0 + m])
        _row_hebb2(
            Sb, x, m, W, W2, KA[i, m], KA[i + 1, m], QB[i + 1, m], QB[i + 2, m], PQ, PQ2
        )  # fmt: skip
    for r in range(p0 + npf, p1):
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
    for r in range(p0, p1):
        prefetch_at(PFA[r])
    for m in range(K):
        _row_hebb_scaled(Sb, x, m, W, KA[i, m], RV[i + 1, m], QB[i + 1, m], PQ)


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


@jit(inline=True)
def _delta_out(
    PK: Array,
    PQ: Array,
    v: Array,
    beta: Array,
    bs: float,
    per_value: bool,
    o: Array,
    b: int,
    r: int,
    hv: int,
    j0: int,
    kq: float,
    cr: float,
    cw: float,
    W: Array,
    x: int,
) -> None:
    """The value-sized work of a delta step from its reads ``PK, PQ`` (``VB``): ``u = beta
    (v - cr pk)``, ``o = cr pq + (k . q~) u`` into ``o[b, r, hv, j0:]``, ``W[x] = cw u``, as
    :func:`chunk_delta_direct`."""
    vr = row(v, b, r, hv, j0)
    orow = row(o, b, r, hv, j0)
    if per_value:
        br = row(beta, b, r, hv, j0)
        for j in range(VB):
            u = br[j] * (vr[j] - cr * PK[j])
            W[x, j] = cw * u
            orow[j] = cr * PQ[j] + kq * u
    else:
        for j in range(VB):
            u = bs * (vr[j] - cr * PK[j])
            W[x, j] = cw * u
            orow[j] = cr * PQ[j] + kq * u


@pass_kernel
def chunk_delta2_direct(
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
    WO: Array,
    pk: Array,
    pq: Array,
    pk2: Array,
    pq2: Array,
    DK: Array,
    DQ: Array,
) -> None:
    """:func:`chunk_delta_direct` with two steps per sweep (:func:`pass_delta2`) where
    neither they nor the step after them renormalises: the reads of step ``i+1`` are taken
    before the write of step ``i`` and corrected, ``pk2 += DK[i+2] w``, ``pq2 += DQ[i+2] w``
    (``DK[r] = KA[r-1] . KB[r]``, ``DQ[r] = KA[r-1] . QB[r]``, ``w``: the write of step
    ``i``, then pending in ``WO`` beside the write of step ``i+1`` in ``W[x]``). A run of
    such sweeps starts with one write pending and ends with a sweep that reads one step, one
    step before the chunk ends, so no chunk ends with two writes pending. ``WO``, ``pk``,
    ``pq``, ``pk2``, ``pq2``: ``VB`` scratch each, separate arrays (rows of one 2-D array
    may overlap as far as LLVM knows, and it then keeps no accumulator in a register): the
    reads of the first and second step of a sweep. ``PK[x]``, ``PQ[x]`` are read for steps
    before ``i0`` (:func:`pass_load`).
    """
    prefer_512()
    pend = False  # two writes pending: KA[i-1] WO, then KA[i] W[x]
    i = 0
    while i < rc:
        p0, p1 = _lines(PFA, pf0, per, i)
        if i >= i0 and i + 2 < rc and not (RVF[i + 1] or RVF[i + 2] or RVF[i + 3]):
            p1 = _lines(PFA, pf0, per, i + 1)[1]
            if pend:
                pass_delta2(Sb, x, WO, W, KA, KB, QB, i, pk, pq, pk2, pq2, PFA, p0, p1, 2, 2)
            else:
                pass_delta2(Sb, x, WO, W, KA, KB, QB, i, pk, pq, pk2, pq2, PFA, p0, p1, 1, 2)
            _delta_out(
                pk, pq, v, beta, BS[i], per_value, o, b, r0 + i, hv, j0, KQ[i + 1], CR[i + 1],
                CW[i + 1], W, x,
            )  # fmt: skip
            # Step i+1: its reads corrected for the write of step i (in W[x]), which then
            # moves to WO.
            dk = DK[i + 2]
            dq = DQ[i + 2]
            for j in range(VB):
                w = W[x, j]
                WO[j] = w
                pk[j] = pk2[j] + dk * w
                pq[j] = pq2[j] + dq * w
            _delta_out(
                pk, pq, v, beta, BS[i + 1], per_value, o, b, r0 + i + 1, hv, j0, KQ[i + 2],
                CR[i + 2], CW[i + 2], W, x,
            )  # fmt: skip
            pend = True
            i += 2
            continue
        if i < i0:
            for r in range(p0, p1):
                prefetch_at(PFA[r])
            for j in range(VB):
                pk[j] = PK[x, j]
                pq[j] = PQ[x, j]
        elif pend:
            pass_delta2(Sb, x, WO, W, KA, KB, QB, i, pk, pq, pk2, pq2, PFA, p0, p1, 2, 1)
        elif RVF[i + 1]:
            pass_delta_scaled(Sb, x, W, KA, RV, KB, QB, i, PK, PQ, PFA, p0, p1)
            for j in range(VB):
                pk[j] = PK[x, j]
                pq[j] = PQ[x, j]
        else:
            pass_delta2(Sb, x, WO, W, KA, KB, QB, i, pk, pq, pk2, pq2, PFA, p0, p1, 1, 1)
        pend = False
        _delta_out(
            pk, pq, v, beta, BS[i], per_value, o, b, r0 + i, hv, j0, KQ[i + 1], CR[i + 1],
            CW[i + 1], W, x,
        )  # fmt: skip
        i += 1


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
    W2: Array,
    PQ2: Array,
) -> None:
    """:func:`chunk_hebb` reading ``v`` and writing ``o`` in place (see
    :func:`chunk_delta_direct`). Two steps neither of which renormalises run as one
    :func:`pass_hebb2` (``W2``, ``PQ2``: ``VB`` scratch each)."""
    prefer_512()
    i = 0
    while i < rc:
        p0, p1 = _lines(PFA, pf0, per, i)
        if i >= i0 and i + 1 < rc and not RVF[i + 1] and not RVF[i + 2]:
            vr = row(v, b, r0 + i, hv, j0)
            vr2 = row(v, b, r0 + i + 1, hv, j0)
            cw = CW[i + 1]
            for j in range(VB):
                W2[j] = cw * vr[j]
            p1 = _lines(PFA, pf0, per, i + 1)[1]
            pass_hebb2(Sb, x, W, W2, KA, QB, i, PQ, PQ2, PFA, p0, p1)
            kq = KQ[i + 1]
            cr = CR[i + 1]
            orow = row(o, b, r0 + i, hv, j0)
            for j in range(VB):
                orow[j] = cr * PQ[x, j] + kq * vr[j]
            kq = KQ[i + 2]
            cr = CR[i + 2]
            cw = CW[i + 2]
            orow = row(o, b, r0 + i + 1, hv, j0)
            for j in range(VB):
                u = vr2[j]
                W[x, j] = cw * u
                orow[j] = cr * PQ2[j] + kq * u
            i += 2
            continue
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
        i += 1


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
