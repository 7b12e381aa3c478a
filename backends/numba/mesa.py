"""MesaNet (``mesa_net``): the recurrent form and decoding steps.

Per (sequence, value head), with ``q~ = scale * q`` (``q, k`` l2-normalised first if asked)::

    H_t = e^{g_t} H_{t-1} + beta_t k_t k_t^T           [K, K]
    G_t = e^{g_t} G_{t-1} + beta_t k_t v_t^T           [K, V]
    (H_t + Diag(lamb)) x_t = q~_t,    o_t = G_t^T x_t

``g = -inf`` resets both states (selected, not multiplied: a NaN or Inf there does not survive
it). ``solver="exact"`` factors ``A = H_t + Diag(lamb) = L L^T`` (Cholesky, the lower triangle
of ``A`` as :func:`numpy.linalg.cholesky` reads it) and solves ``L y = q~``, ``L^T x = y``;
``solver="cg"`` runs fla's conjugate gradient exactly as ``fastweights.testing.naive._cg``:
``x = 0``, ``r = p = q~``, ``max_cg_iterations`` steps with ``1e-5`` added to both
denominators, no early stop (the same in a decoding step). A matrix that is not positive
definite (only with negative ``beta`` or a non-PSD initial ``H``) gives NaN, not an error.

One task per (sequence, value head), run in parallel with ``prange``, longest sequences first.
A task keeps ``H^T`` (``HT[c, i] = H[i, c]``, padded to ``KP x KP`` with rows of the identity,
``KP`` = K rounded up to ``CW = 16`` lanes), a work matrix ``W [KP, KP]`` and ``G`` in local
buffers (48 KiB at K = V = 64 in float32: L1), and per token runs:

1. ``HT = e^g HT + k (beta k)^T`` (16-lane vectors; ``A = H + Diag(lamb)``'s lower triangle by
   columns is the upper part of ``HT``'s rows: what :func:`numpy.linalg.cholesky` reads);
2. a left-looking Cholesky of ``A`` into ``W`` by blocks of 4 columns (row ``j`` of ``W`` =
   column ``j`` of ``L``): a register tile of 4 columns x up to 4 chunks applies every
   earlier column to a block, reading the block from ``HT`` (+ ``lamb``) on its first touch
   (:func:`fold4`, ``K^3/6`` FMAs in all), then the block's 4 columns are factored in
   registers, the pivots and multipliers taken from lanes of its first chunk
   (:func:`factor4`, a chain of square roots without trips through memory), with the forward
   solve ``L y = q~`` applied along. The next block's fold by all earlier columns is issued
   right after a block's factorisation, which it does not depend on, to overlap its chain;
3. the backward solve ``L^T x = y`` by blocks of 4 rows from the bottom (4 dot products with
   the known part of ``x``, then the 4 x 4 triangle), fused with the update of ``G``'s rows
   and the read ``o = G^T x``.

The chunk loops are LLVM vector code written as numba intrinsics (numba's own loops over a
chunk were unrolled, then vectorised across chunks into gathers and scatters); in the checked
build every chunk range and tile is checked against its array first, without JIT they are
NumPy. With ``solver="cg"`` step 2 is fla's CG, whose matrix-vector product ``A p = sum_c p_c
HT[c, :] + lamb p`` is one register-tiled pass over ``HT`` per step (:func:`matvec`), and step
3 is the ``G`` update and read alone.

A decoding step runs the same kernel with the pools as both the initial and the final states
(a task reads its rows before it writes them; validation refuses repeated state indices).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from fastweights.backends import L2NORM_EPS, Call

from ._jit import CHECKED, DISABLE_JIT, address, jit, prefer_512, row
from ._layout import call_kernel, dummy, launch, sequences, unit_last
from ._plan import plan

CW = 16
"""Lanes per chunk: one 512-bit vector of float32 (two of float64)."""

ALIGN = 64
"""Bytes: local buffers start on a cache line."""

CG_EPS = 1e-5
"""fla's term in both denominators of its conjugate gradient."""

Array = Any
_pass = jit(nrt=False, noalias=True)

# ------------------------------------------------------------------------ chunk primitives
#
# Loops over chunks ``[c0, c1)`` of ``CW`` lanes of rows from :func:`row`, written as LLVM
# vector code: numba's loops over a chunk were unrolled first, then vectorised across chunks
# into gathers and scatters (5-10x slower). ``p`` is the row's pointer; in the checked build
# each chunk range is checked against the row's length first, without JIT they are NumPy.

if DISABLE_JIT:

    def _sl(c0: int, c1: int) -> slice:
        return slice(c0 * CW, max(c0, c1) * CW)

    def vaxpy(d: Any, s: Any, a: float, c0: int, c1: int) -> None:
        """``d += a s``."""
        d[_sl(c0, c1)] += a * s[_sl(c0, c1)]

    def vaxpby(d: Any, s: Any, a: float, b: float, c0: int, c1: int) -> None:
        """``d = a d + b s``."""
        d[_sl(c0, c1)] = a * d[_sl(c0, c1)] + b * s[_sl(c0, c1)]

    def vscal(d: Any, s: Any, b: float, c0: int, c1: int) -> None:
        """``d = b s``."""
        d[_sl(c0, c1)] = b * s[_sl(c0, c1)]

    def hrow(
        h: Any,
        s: Any,
        w: Any,
        a: float,
        b: float,
        lm: float,
        c: int,
        reset: bool,
        copy: bool,
        c1: int,
    ) -> None:
        """Row ``c`` of ``HT = a HT + b s`` (``b s`` on a reset) over chunks ``[0, c1)``; with
        ``copy`` also ``w = h + lm e_c`` from row ``c``'s own chunk on."""
        sl = _sl(0, c1)
        h[sl] = b * s[sl] if reset else a * h[sl] + b * s[sl]
        if copy:
            sw = _sl(c // CW, c1)
            w[sw] = h[sw]
            w[c] += lm

    def vaxpby_read(d: Any, s: Any, o: Any, a: float, b: float, x: float, c0: int, c1: int) -> None:
        """``d = a d + b s``, then ``o += x d``."""
        d[_sl(c0, c1)] = a * d[_sl(c0, c1)] + b * s[_sl(c0, c1)]
        o[_sl(c0, c1)] += x * d[_sl(c0, c1)]

    def vscal_read(d: Any, s: Any, o: Any, b: float, x: float, c0: int, c1: int) -> None:
        """``d = b s``, then ``o += x d``."""
        d[_sl(c0, c1)] = b * s[_sl(c0, c1)]
        o[_sl(c0, c1)] += x * d[_sl(c0, c1)]

    def vdot(p: Any, q: Any, zero: float, c0: int, c1: int) -> float:
        """``zero + sum p q``."""
        return zero + np.sum(p[_sl(c0, c1)] * q[_sl(c0, c1)])

    def vscalemask(d: Any, inv: float, j: int, c0: int, c1: int) -> None:
        """``d[i] = d[i] inv`` where ``i > j``, else 0."""
        sl = _sl(c0, c1)
        i = np.arange(sl.start, sl.stop)
        d[sl] = np.where(i > j, d[sl] * inv, 0.0)

    def fold4(
        W: Any, j: int, m0: int, m1: int, c0: int, c1: int, HT: Any, lm: Any, init: bool
    ) -> None:
        """``W[j + c, chunks] -= sum_m W[m, j + c] W[m, chunks]``, ``c < 4``, ``m0 <= m < m1``;
        with ``init`` the rows start from ``HT``'s plus ``lm`` on the diagonal."""
        A = W[0, 0]
        sl = _sl(c0, c1)
        if init:
            A[j : j + 4, sl] = HT[0, 0, j : j + 4, sl]
            for c in range(4):
                A[j + c, j + c] += lm[j + c]
        A[j : j + 4, sl] -= A[m0:m1, j : j + 4].T @ A[m0:m1, sl]

    def factor4(W: Any, j: int, y: Any, idg: Any, c0: int, c1: int, one: float) -> None:
        """Factor columns ``j .. j+3`` (already updated by every earlier column) and apply
        them to ``y`` (see :func:`_factor4`)."""
        A = W[0, 0]
        sl = _sl(c0, c1)
        i = np.arange(sl.start, sl.stop)
        for c in range(4):
            col = j + c
            inv = one / np.sqrt(A[col, col])
            idg[col] = inv
            A[col, sl] = np.where(i > col, A[col, sl] * inv, 0.0)
            for d in range(c + 1, 4):
                A[j + d, sl] += -A[col, j + d] * A[col, sl]
            yj = y[col] * inv
            y[sl] += -yj * A[col, sl]
            y[col] = yj

    def matvec(HT: Any, p: Any, ap: Any, lm: Any, c0: int, c1: int) -> None:
        """``ap = lm p + sum_c p[c] HT[c, :]`` over chunks ``[c0, c1)`` (``H p`` with ``HT =
        H^T``, plus the ridge)."""
        A = HT[0, 0]
        sl = _sl(c0, c1)
        ap[sl] = lm[sl] * p[sl] + A[:, sl].T @ p[: A.shape[0]]

    def dot4(W: Any, j: int, x: Any, c0: int, c1: int) -> tuple[float, float, float, float]:
        """``W[j + c, chunks] . x[chunks]`` for ``c < 4``."""
        sl = _sl(c0, c1)
        d = W[0, 0, j : j + 4, sl] @ x[sl]
        return d[0], d[1], d[2], d[3]

else:
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic as _intrinsic

    intrinsic: Any = _intrinsic

    def _chunks(context: Any, builder: Any, sig: Any, args: Any, body: Any) -> None:
        """Call ``body(vector type, alignment, pointer of chunk)`` for chunks ``args[-2:]``."""
        dt = sig.args[0].dtype
        vty = ir.VectorType(context.get_value_type(dt), CW)
        align = context.get_abi_sizeof(context.get_value_type(dt))
        lo = context.cast(builder, args[-2], sig.args[-2], types.intp)
        hi = context.cast(builder, args[-1], sig.args[-1], types.intp)
        step = ir.Constant(lo.type, 1)
        with cgutils.for_range_slice(builder, lo, hi, step, inc=True) as (ch, _):
            off = builder.mul(ch, ir.Constant(ch.type, CW))

            def at(ptr: Any) -> Any:
                return builder.bitcast(builder.gep(ptr, [off], inbounds=True), vty.as_pointer())

            body(vty, align, at)

    def _splat(builder: Any, x: Any, vty: Any) -> Any:
        v = builder.insert_element(
            ir.Constant(vty, ir.Undefined), x, ir.Constant(ir.IntType(32), 0)
        )
        mask = ir.Constant(ir.VectorType(ir.IntType(32), CW), [0] * CW)
        return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)

    def _fma(builder: Any, a: Any, b: Any, c: Any) -> Any:
        """``a b + c`` elementwise."""
        el = "f32" if a.type.element == ir.FloatType() else "f64"
        fnty = ir.FunctionType(a.type, [a.type, a.type, a.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.v{CW}{el}")
        return builder.call(fn, [a, b, c])

    def _splats(context: Any, builder: Any, sig: Any, args: Any, idx: Any) -> list[Any]:
        dt = sig.args[0].dtype
        vty = ir.VectorType(context.get_value_type(dt), CW)
        out = []
        for i in idx:
            x = context.cast(builder, args[i], sig.args[i], dt)
            out.append(_splat(builder, x, vty))
        return out

    @intrinsic
    def _vaxpy(typingctx: Any, d: Any, s: Any, a: Any, c0: Any, c1: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            (va,) = _splats(context, builder, sig, args, (2,))

            def body(vty: Any, al: Any, at: Any) -> None:
                pd = at(args[0])
                x = builder.load(pd, align=al, typ=vty)
                y = builder.load(at(args[1]), align=al, typ=vty)
                builder.store(_fma(builder, va, y, x), pd, align=al)

            _chunks(context, builder, sig, args, body)
            return context.get_dummy_value()

        return types.void(d, s, a, c0, c1), codegen

    @intrinsic
    def _vaxpby(typingctx: Any, d: Any, s: Any, a: Any, b: Any, c0: Any, c1: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            va, vb = _splats(context, builder, sig, args, (2, 3))

            def body(vty: Any, al: Any, at: Any) -> None:
                pd = at(args[0])
                x = builder.load(pd, align=al, typ=vty)
                y = builder.load(at(args[1]), align=al, typ=vty)
                builder.store(_fma(builder, va, x, builder.fmul(vb, y)), pd, align=al)

            _chunks(context, builder, sig, args, body)
            return context.get_dummy_value()

        return types.void(d, s, a, b, c0, c1), codegen

    @intrinsic
    def _vscal(typingctx: Any, d: Any, s: Any, b: Any, c0: Any, c1: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            (vb,) = _splats(context, builder, sig, args, (2,))

            def body(vty: Any, al: Any, at: Any) -> None:
                y = builder.load(at(args[1]), align=al, typ=vty)
                builder.store(builder.fmul(vb, y), at(args[0]), align=al)

            _chunks(context, builder, sig, args, body)
            return context.get_dummy_value()

        return types.void(d, s, b, c0, c1), codegen

    @intrinsic
    def _hrow(
        typingctx: Any,
        h: Any,
        s: Any,
        w: Any,
        a: Any,
        b: Any,
        lm: Any,
        c: Any,
        reset: Any,
        copy: Any,
        c1: Any,
    ) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            dt = sig.args[0].dtype
            ety = context.get_value_type(dt)
            vty = ir.VectorType(ety, CW)
            al = context.get_abi_sizeof(ety)
            va, vb, vl = _splats(context, builder, sig, args, (3, 4, 5))
            hp, sp, wp = args[0], args[1], args[2]
            it = context.get_value_type(types.intp)
            cv = context.cast(builder, args[6], sig.args[6], types.intp)
            hi = context.cast(builder, args[9], sig.args[9], types.intp)
            rs = context.cast(builder, args[7], sig.args[7], types.boolean)
            cp = context.cast(builder, args[8], sig.args[8], types.boolean)
            cwc = ir.Constant(it, CW)
            first = builder.sdiv(cv, cwc)
            i64v = ir.VectorType(ir.IntType(64), CW)
            lanes = ir.Constant(i64v, list(range(CW)))
            cs = _splat(builder, builder.sext(cv, ir.IntType(64)) if it.width < 64 else cv, i64v)
            zero = ir.Constant(vty, None)
            with cgutils.for_range_slice(
                builder, ir.Constant(it, 0), hi, ir.Constant(it, 1), inc=True
            ) as (
                ch,
                _,
            ):
                off = builder.mul(ch, cwc)
                bs = builder.fmul(vb, _vload(builder, sp, off, vty, al))
                old = _vload(builder, hp, off, vty, al)
                hn = builder.select(rs, bs, _fma(builder, va, old, bs))
                _vstore(builder, hn, hp, off, al)
                inw = builder.and_(cp, builder.icmp_signed(">=", ch, first))
                with builder.if_then(inw):
                    off64 = builder.sext(off, ir.IntType(64)) if it.width < 64 else off
                    idx = builder.add(_splat(builder, off64, i64v), lanes)
                    diag = builder.select(builder.icmp_signed("==", idx, cs), vl, zero)
                    _vstore(builder, builder.fadd(hn, diag), wp, off, al)
            return context.get_dummy_value()

        return types.void(h, s, w, a, b, lm, c, reset, copy, c1), codegen

    @intrinsic
    def _vaxpby_read(
        typingctx: Any, d: Any, s: Any, o: Any, a: Any, b: Any, x: Any, c0: Any, c1: Any
    ) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            va, vb, vx = _splats(context, builder, sig, args, (3, 4, 5))

            def body(vty: Any, al: Any, at: Any) -> None:
                pd = at(args[0])
                po = at(args[2])
                g = builder.load(pd, align=al, typ=vty)
                y = builder.load(at(args[1]), align=al, typ=vty)
                g = _fma(builder, va, g, builder.fmul(vb, y))
                builder.store(g, pd, align=al)
                acc = builder.load(po, align=al, typ=vty)
                builder.store(_fma(builder, vx, g, acc), po, align=al)

            _chunks(context, builder, sig, args, body)
            return context.get_dummy_value()

        return types.void(d, s, o, a, b, x, c0, c1), codegen

    @intrinsic
    def _vscal_read(
        typingctx: Any, d: Any, s: Any, o: Any, b: Any, x: Any, c0: Any, c1: Any
    ) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            vb, vx = _splats(context, builder, sig, args, (3, 4))

            def body(vty: Any, al: Any, at: Any) -> None:
                po = at(args[2])
                g = builder.fmul(vb, builder.load(at(args[1]), align=al, typ=vty))
                builder.store(g, at(args[0]), align=al)
                acc = builder.load(po, align=al, typ=vty)
                builder.store(_fma(builder, vx, g, acc), po, align=al)

            _chunks(context, builder, sig, args, body)
            return context.get_dummy_value()

        return types.void(d, s, o, b, x, c0, c1), codegen

    @intrinsic
    def _vdot(typingctx: Any, p: Any, q: Any, zero: Any, c0: Any, c1: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            dt = sig.args[0].dtype
            vty = ir.VectorType(context.get_value_type(dt), CW)
            acc = cgutils.alloca_once_value(builder, ir.Constant(vty, None))

            def body(vty: Any, al: Any, at: Any) -> None:
                x = builder.load(at(args[0]), align=al, typ=vty)
                y = builder.load(at(args[1]), align=al, typ=vty)
                builder.store(_fma(builder, x, y, builder.load(acc)), acc)

            _chunks(context, builder, sig, args, body)
            # Pairwise halves down to one lane.
            v = builder.load(acc)
            n = CW
            while n > 1:
                n //= 2
                lo = builder.shuffle_vector(
                    v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n)))
                )
                hi = builder.shuffle_vector(
                    v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n, 2 * n)))
                )
                v = builder.fadd(lo, hi)
            s = builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
            z = context.cast(builder, args[2], sig.args[2], dt)
            return builder.fadd(z, s)

        return p.dtype(p, q, zero, c0, c1), codegen

    def _vload(builder: Any, ptr: Any, off: Any, vty: Any, al: int) -> Any:
        p = builder.bitcast(builder.gep(ptr, [off], inbounds=True), vty.as_pointer())
        return builder.load(p, align=al, typ=vty)

    def _vstore(builder: Any, value: Any, ptr: Any, off: Any, al: int) -> None:
        p = builder.bitcast(builder.gep(ptr, [off], inbounds=True), value.type.as_pointer())
        builder.store(value, p, align=al)

    def _hsum(builder: Any, v: Any) -> Any:
        """The sum of a vector's lanes, pairwise halves."""
        n = CW
        while n > 1:
            n //= 2
            i32 = ir.IntType(32)
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n))))
            hi = builder.shuffle_vector(
                v, v, ir.Constant(ir.VectorType(i32, n), list(range(n, 2 * n)))
            )
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    @intrinsic
    def _vscalemask(typingctx: Any, d: Any, inv: Any, j: Any, c0: Any, c1: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            (vi,) = _splats(context, builder, sig, args, (1,))
            i64 = ir.IntType(64)
            jj = _splat(
                builder,
                context.cast(builder, args[2], sig.args[2], types.int64),
                ir.VectorType(i64, CW),
            )
            lanes = ir.Constant(ir.VectorType(i64, CW), list(range(CW)))

            dt = sig.args[0].dtype
            vty = ir.VectorType(context.get_value_type(dt), CW)
            al = context.get_abi_sizeof(context.get_value_type(dt))
            lo = context.cast(builder, args[3], sig.args[3], types.intp)
            hi = context.cast(builder, args[4], sig.args[4], types.intp)
            with cgutils.for_range_slice(builder, lo, hi, ir.Constant(lo.type, 1), inc=True) as (
                ch,
                _,
            ):
                off = builder.mul(ch, ir.Constant(ch.type, CW))
                idx = builder.add(_splat(builder, off, ir.VectorType(i64, CW)), lanes)
                keep = builder.icmp_signed(">", idx, jj)
                x = builder.fmul(_vload(builder, args[0], off, vty, al), vi)
                _vstore(builder, builder.select(keep, x, ir.Constant(vty, None)), args[0], off, al)
            return context.get_dummy_value()

        return types.void(d, inv, j, c0, c1), codegen

    @intrinsic
    def _fold4(
        typingctx: Any,
        w: Any,
        stride: Any,
        j: Any,
        m0: Any,
        m1: Any,
        c0: Any,
        c1: Any,
        src: Any,
        lm: Any,
        init: Any,
    ) -> Any:
        """``W[j + c, chunks c0..c1] -= sum_{m0 <= m < m1} W[m, j + c] W[m, chunks]``, ``c <
        4``, with ``W[r, i] = w[r stride + i]``: the left-looking update of four columns, a
        register tile of 4 columns x up to 4 chunks (two partial sums over ``m`` when the
        tile has at most 2 chunks, for enough independent FMAs). With ``init`` the rows start
        from ``src`` (same layout: ``H^T``) plus ``lm[j + c]`` on the diagonal instead of from
        ``W``: the matrix is never copied into ``W`` as a whole."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            dt = sig.args[0].dtype
            ety = context.get_value_type(dt)
            vty = ir.VectorType(ety, CW)
            al = context.get_abi_sizeof(ety)
            wp, sp_, lp = args[0], args[7], args[8]
            ints = [
                context.cast(builder, a, t, types.intp)
                for a, t in zip(args[1:7], sig.args[1:7], strict=True)
            ]
            stride, jv, m0v, m1v, c0v, c1v = ints
            initv = context.cast(builder, args[9], sig.args[9], types.boolean)
            one = ir.Constant(stride.type, 1)
            cwc = ir.Constant(stride.type, CW)
            i64 = ir.IntType(64)
            i64v = ir.VectorType(i64, CW)
            lanes = ir.Constant(i64v, list(range(CW)))

            def to64(x: Any) -> Any:
                return builder.sext(x, i64) if x.type.width < 64 else x

            def variant(g: Any, nq: int) -> None:
                sets = 2 if nq <= 2 else 1
                accs = [
                    [[cgutils.alloca_once(builder, vty) for _ in range(nq)] for _ in range(4)]
                    for _ in range(sets)
                ]
                for st in accs:
                    for rowacc in st:
                        for a in rowacc:
                            builder.store(ir.Constant(vty, None), a)
                goff = builder.mul(g, cwc)

                def term(m: Any, st: Any) -> None:
                    base = builder.mul(m, stride)
                    bs = [
                        _vload(
                            builder,
                            wp,
                            builder.add(base, builder.add(goff, ir.Constant(stride.type, q * CW))),
                            vty,
                            al,
                        )
                        for q in range(nq)
                    ]
                    for c in range(4):
                        sp = builder.gep(
                            wp,
                            [builder.add(base, builder.add(jv, ir.Constant(stride.type, c)))],
                            inbounds=True,
                        )
                        va = _splat(builder, builder.load(sp, typ=ety), vty)
                        for q in range(nq):
                            acc = builder.load(st[c][q], typ=vty)
                            builder.store(_fma(builder, va, bs[q], acc), st[c][q])

                n = builder.sub(m1v, m0v)
                if sets == 2:
                    half = builder.sdiv(n, ir.Constant(n.type, 2))
                    with cgutils.for_range_slice(
                        builder, ir.Constant(n.type, 0), half, one, inc=True
                    ) as (i, _):
                        term(builder.add(m0v, i), accs[0])
                        term(builder.add(builder.add(m0v, half), i), accs[1])
                    start = builder.add(m0v, builder.add(half, half))
                else:
                    start = m0v
                with cgutils.for_range_slice(builder, start, m1v, one, inc=True) as (m, _):
                    term(m, accs[0])
                for c in range(4):
                    col = builder.add(jv, ir.Constant(stride.type, c))
                    rbase = builder.mul(col, stride)
                    lc = builder.load(builder.gep(lp, [col], inbounds=True), typ=ety)
                    diag = _splat(builder, lc, vty)
                    colv = _splat(builder, to64(col), i64v)
                    for q in range(nq):
                        inrow = builder.add(goff, ir.Constant(stride.type, q * CW))
                        off = builder.add(rbase, inrow)
                        tot = builder.load(accs[0][c][q], typ=vty)
                        if sets == 2:
                            tot = builder.fadd(tot, builder.load(accs[1][c][q], typ=vty))
                        idx = builder.add(_splat(builder, to64(inrow), i64v), lanes)
                        first = builder.fadd(
                            _vload(builder, sp_, off, vty, al),
                            builder.select(
                                builder.icmp_signed("==", idx, colv), diag, ir.Constant(vty, None)
                            ),
                        )
                        cur = builder.select(initv, first, _vload(builder, wp, off, vty, al))
                        _vstore(builder, builder.fsub(cur, tot), wp, off, al)

            four = ir.Constant(stride.type, 4)
            with cgutils.for_range_slice(builder, c0v, c1v, four, inc=True) as (g, _):
                left = builder.sub(c1v, g)
                for nq in (4, 3, 2, 1):
                    cond = builder.icmp_signed(
                        ">=" if nq == 4 else "==", left, ir.Constant(left.type, nq)
                    )
                    with builder.if_then(cond):  # exactly one runs: groups step by 4
                        variant(g, nq)
            return context.get_dummy_value()

        return types.void(w, stride, j, m0, m1, c0, c1, src, lm, init), codegen

    @intrinsic
    def _factor4(
        typingctx: Any,
        w: Any,
        stride: Any,
        j: Any,
        y: Any,
        idg: Any,
        c0: Any,
        c1: Any,
        one: Any,
    ) -> Any:
        """Factor columns ``j .. j+3`` of ``W`` (``W[r, i] = w[r stride + i]``, rows from
        chunk ``c0 = j // CW`` to ``c1``; every earlier column already applied) and apply them
        to ``y``: the first chunk in registers, its lanes giving the pivots and the block's own
        multipliers (a chain of square roots without trips through memory), then the other
        chunks with those scalars, independent of each other. ``idg[j + c] = 1 / L[j+c, j+c]``.
        ``j`` must be a multiple of 4: the lanes are constants in four variants of the code."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            dt = sig.args[0].dtype
            ety = context.get_value_type(dt)
            vty = ir.VectorType(ety, CW)
            al = context.get_abi_sizeof(ety)
            wp, yp, ip = args[0], args[3], args[4]
            intp = types.intp
            stride = context.cast(builder, args[1], sig.args[1], intp)
            jv = context.cast(builder, args[2], sig.args[2], intp)
            c0v = context.cast(builder, args[5], sig.args[5], intp)
            c1v = context.cast(builder, args[6], sig.args[6], intp)
            onev = context.cast(builder, args[7], sig.args[7], dt)
            it = stride.type
            i32 = ir.IntType(32)
            cwc = ir.Constant(it, CW)
            off0 = builder.mul(c0v, cwc)
            i64v = ir.VectorType(ir.IntType(64), CW)
            idx0 = builder.add(
                _splat(
                    builder, builder.sext(off0, ir.IntType(64)) if it.width < 64 else off0, i64v
                ),
                ir.Constant(i64v, list(range(CW))),
            )
            sq = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ety, [ety]),
                "llvm.sqrt.f32" if ety == ir.FloatType() else "llvm.sqrt.f64",
            )
            zero = ir.Constant(vty, None)
            rows = [builder.mul(builder.add(jv, ir.Constant(it, c)), stride) for c in range(4)]
            band = builder.sdiv(builder.sub(jv, off0), ir.Constant(it, 4))

            def variant(bl: int) -> None:
                v = [_vload(builder, wp, builder.add(rows[c], off0), vty, al) for c in range(4)]
                yv = _vload(builder, yp, off0, vty, al)
                invs, yjs = [], []
                ls: dict[tuple[int, int], Any] = {}
                for c in range(4):
                    lane = ir.Constant(i32, bl + c)
                    col = builder.add(jv, ir.Constant(it, c))
                    inv = builder.fdiv(
                        onev, builder.call(sq, [builder.extract_element(v[c], lane)])
                    )
                    builder.store(inv, builder.gep(ip, [col], inbounds=True))
                    col64 = builder.sext(col, ir.IntType(64)) if it.width < 64 else col
                    keep = builder.icmp_signed(">", idx0, _splat(builder, col64, i64v))
                    v[c] = builder.select(keep, builder.fmul(v[c], _splat(builder, inv, vty)), zero)
                    for d in range(c + 1, 4):
                        lv = builder.extract_element(v[c], ir.Constant(i32, bl + d))
                        ls[c, d] = builder.fneg(lv)
                        v[d] = _fma(builder, _splat(builder, ls[c, d], vty), v[c], v[d])
                    yj = builder.fmul(builder.extract_element(yv, lane), inv)
                    yjs.append(builder.fneg(yj))
                    yv = _fma(builder, _splat(builder, yjs[c], vty), v[c], yv)
                    yv = builder.insert_element(yv, yj, lane)
                    invs.append(inv)
                for c in range(4):
                    _vstore(builder, v[c], wp, builder.add(rows[c], off0), al)
                _vstore(builder, yv, yp, off0, al)
                sinv = [_splat(builder, x, vty) for x in invs]
                sy = [_splat(builder, x, vty) for x in yjs]
                sl = {key: _splat(builder, x, vty) for key, x in ls.items()}
                first = builder.add(c0v, ir.Constant(it, 1))
                with cgutils.for_range_slice(builder, first, c1v, ir.Constant(it, 1), inc=True) as (
                    q,
                    _,
                ):
                    off = builder.mul(q, cwc)
                    u = [_vload(builder, wp, builder.add(rows[c], off), vty, al) for c in range(4)]
                    yq = _vload(builder, yp, off, vty, al)
                    for c in range(4):
                        u[c] = builder.fmul(u[c], sinv[c])
                        for d in range(c + 1, 4):
                            u[d] = _fma(builder, sl[c, d], u[c], u[d])
                        yq = _fma(builder, sy[c], u[c], yq)
                    for c in range(4):
                        _vstore(builder, u[c], wp, builder.add(rows[c], off), al)
                    _vstore(builder, yq, yp, off, al)

            for b in range(CW // 4):
                with builder.if_then(builder.icmp_signed("==", band, ir.Constant(it, b))):
                    variant(4 * b)
            return context.get_dummy_value()

        return types.void(w, stride, j, y, idg, c0, c1, one), codegen

    @intrinsic
    def _matvec(
        typingctx: Any,
        ht: Any,
        stride: Any,
        K: Any,
        p: Any,
        ap: Any,
        lm: Any,
        c0: Any,
        c1: Any,
    ) -> Any:
        """``ap = lm p + sum_{c < K} p[c] HT[c, :]`` on chunks ``[c0, c1)`` (``HT[c, i] = ht[c
        stride + i]``): register tiles of up to 4 chunks, 2-4 partial sums over ``c``."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            dt = sig.args[0].dtype
            ety = context.get_value_type(dt)
            vty = ir.VectorType(ety, CW)
            al = context.get_abi_sizeof(ety)
            hp, pp, app, lp = args[0], args[3], args[4], args[5]
            intp = types.intp
            stride = context.cast(builder, args[1], sig.args[1], intp)
            kv = context.cast(builder, args[2], sig.args[2], intp)
            c0v = context.cast(builder, args[6], sig.args[6], intp)
            c1v = context.cast(builder, args[7], sig.args[7], intp)
            it = stride.type
            one = ir.Constant(it, 1)
            cwc = ir.Constant(it, CW)

            def variant(g: Any, nq: int) -> None:
                sets = 2 if nq >= 3 else 4
                accs = [[cgutils.alloca_once(builder, vty) for _ in range(nq)] for _ in range(sets)]
                for st in accs:
                    for a in st:
                        builder.store(ir.Constant(vty, None), a)
                goff = builder.mul(g, cwc)

                def term(c: Any, st: Any) -> None:
                    base = builder.add(builder.mul(c, stride), goff)
                    pc = builder.load(builder.gep(pp, [c], inbounds=True), typ=ety)
                    pv = _splat(builder, pc, vty)
                    for q in range(nq):
                        off = builder.add(base, ir.Constant(it, q * CW))
                        b = _vload(builder, hp, off, vty, al)
                        builder.store(_fma(builder, pv, b, builder.load(st[q], typ=vty)), st[q])

                per = builder.sdiv(kv, ir.Constant(it, sets))
                with cgutils.for_range_slice(builder, ir.Constant(it, 0), per, one, inc=True) as (
                    i,
                    _,
                ):
                    for si in range(sets):
                        c = builder.add(builder.mul(per, ir.Constant(it, si)), i)
                        term(c, accs[si])
                start = builder.mul(per, ir.Constant(it, sets))
                with cgutils.for_range_slice(builder, start, kv, one, inc=True) as (c, _):
                    term(c, accs[0])
                for q in range(nq):
                    off = builder.add(goff, ir.Constant(it, q * CW))
                    tot = builder.load(accs[0][q], typ=vty)
                    for si in range(1, sets):
                        tot = builder.fadd(tot, builder.load(accs[si][q], typ=vty))
                    pv = _vload(builder, pp, off, vty, al)
                    lv = _vload(builder, lp, off, vty, al)
                    _vstore(builder, _fma(builder, lv, pv, tot), app, off, al)

            four = ir.Constant(it, 4)
            with cgutils.for_range_slice(builder, c0v, c1v, four, inc=True) as (g, _):
                left = builder.sub(c1v, g)
                for nq in (4, 3, 2, 1):
                    cond = builder.icmp_signed(
                        ">=" if nq == 4 else "==", left, ir.Constant(left.type, nq)
                    )
                    with builder.if_then(cond):  # exactly one runs: groups step by 4
                        variant(g, nq)
            return context.get_dummy_value()

        return types.void(ht, stride, K, p, ap, lm, c0, c1), codegen

    @intrinsic
    def _dot4(typingctx: Any, w: Any, stride: Any, j: Any, x: Any, c0: Any, c1: Any) -> Any:
        """``(W[j + c, chunks] . x[chunks] for c < 4)`` with ``W[r, i] = w[r stride + i]``."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            dt = sig.args[0].dtype
            ety = context.get_value_type(dt)
            vty = ir.VectorType(ety, CW)
            al = context.get_abi_sizeof(ety)
            wp, xp = args[0], args[3]
            stride = context.cast(builder, args[1], sig.args[1], types.intp)
            jv = context.cast(builder, args[2], sig.args[2], types.intp)
            lo = context.cast(builder, args[4], sig.args[4], types.intp)
            hi = context.cast(builder, args[5], sig.args[5], types.intp)
            accs = [cgutils.alloca_once(builder, vty) for _ in range(4)]
            for a in accs:
                builder.store(ir.Constant(vty, None), a)
            with cgutils.for_range_slice(builder, lo, hi, ir.Constant(lo.type, 1), inc=True) as (
                ch,
                _,
            ):
                off = builder.mul(ch, ir.Constant(ch.type, CW))
                xv = _vload(builder, xp, off, vty, al)
                for c in range(4):
                    r = builder.mul(builder.add(jv, ir.Constant(jv.type, c)), stride)
                    wv = _vload(builder, wp, builder.add(r, off), vty, al)
                    builder.store(_fma(builder, wv, xv, builder.load(accs[c], typ=vty)), accs[c])
            sums = [_hsum(builder, builder.load(a, typ=vty)) for a in accs]
            return context.make_tuple(builder, sig.return_type, sums)

        return types.UniTuple(w.dtype, 4)(w, stride, j, x, c0, c1), codegen

    if CHECKED:

        @njit(inline="always")
        def _ck(p: Any, c0: int, c1: int) -> None:
            if c0 < 0 or (c1 > c0 and c1 * CW > p.n):
                raise IndexError("fastweights checked build: chunk range out of the row")

        @njit(inline="always")
        def vaxpy(d: Any, s: Any, a: float, c0: int, c1: int) -> None:
            _ck(d, c0, c1)
            _ck(s, c0, c1)
            _vaxpy(d.ptr, s.ptr, a, c0, c1)

        @njit(inline="always")
        def vaxpby(d: Any, s: Any, a: float, b: float, c0: int, c1: int) -> None:
            _ck(d, c0, c1)
            _ck(s, c0, c1)
            _vaxpby(d.ptr, s.ptr, a, b, c0, c1)

        @njit(inline="always")
        def vscal(d: Any, s: Any, b: float, c0: int, c1: int) -> None:
            _ck(d, c0, c1)
            _ck(s, c0, c1)
            _vscal(d.ptr, s.ptr, b, c0, c1)

        @njit(inline="always")
        def hrow(
            h: Any,
            s: Any,
            w: Any,
            a: float,
            b: float,
            lm: float,
            c: int,
            reset: bool,
            copy: bool,
            c1: int,
        ) -> None:
            _ck(h, 0, c1)
            _ck(s, 0, c1)
            if copy:
                _ck(w, c // CW, c1)
                if c < 0 or c >= w.n:
                    raise IndexError("fastweights checked build: diagonal out of the row")
            _hrow(h.ptr, s.ptr, w.ptr, a, b, lm, c, reset, copy, c1)

        @njit(inline="always")
        def vaxpby_read(
            d: Any, s: Any, o: Any, a: float, b: float, x: float, c0: int, c1: int
        ) -> None:
            _ck(d, c0, c1)
            _ck(s, c0, c1)
            _ck(o, c0, c1)
            _vaxpby_read(d.ptr, s.ptr, o.ptr, a, b, x, c0, c1)

        @njit(inline="always")
        def vscal_read(d: Any, s: Any, o: Any, b: float, x: float, c0: int, c1: int) -> None:
            _ck(d, c0, c1)
            _ck(s, c0, c1)
            _ck(o, c0, c1)
            _vscal_read(d.ptr, s.ptr, o.ptr, b, x, c0, c1)

        @njit(inline="always")
        def vdot(p: Any, q: Any, zero: float, c0: int, c1: int) -> float:
            _ck(p, c0, c1)
            _ck(q, c0, c1)
            return _vdot(p.ptr, q.ptr, zero, c0, c1)

        @njit(inline="always")
        def vscalemask(d: Any, inv: float, j: int, c0: int, c1: int) -> None:
            _ck(d, c0, c1)
            _vscalemask(d.ptr, inv, j, c0, c1)

        @njit(inline="always")
        def _base(W: Any) -> Any:
            return row(W, 0, 0, 0, 0).ptr

    else:

        @njit(inline="always")
        def _ck(p: Any, c0: int, c1: int) -> None:
            """No check in the fast build."""

        vaxpy, vaxpby, vscal, hrow = _vaxpy, _vaxpby, _vscal, _hrow
        vaxpby_read, vscal_read, vdot, vscalemask = _vaxpby_read, _vscal_read, _vdot, _vscalemask

        @njit(inline="always")
        def _base(W: Any) -> Any:
            return row(W, 0, 0, 0, 0)

    @njit(inline="always")
    def _ck_tile(W: Any, j: int, m0: int, m1: int, c0: int, c1: int) -> None:
        """The checked build's range check of :func:`fold4` and :func:`dot4` (a C-ordered
        ``W`` is what their row stride assumes)."""
        if CHECKED:
            R = W.shape[2]
            ok = j >= 0 and j + 4 <= R and m0 >= 0 and m0 <= m1 and m1 <= R and c0 >= 0
            ok = ok and (c1 <= c0 or c1 * CW <= W.shape[3])
            ok = ok and W.strides[3] == W.itemsize and W.strides[2] == W.shape[3] * W.itemsize
            if not ok:
                raise IndexError("fastweights checked build: tile out of the matrix")

    @njit(inline="always")
    def fold4(
        W: Any, j: int, m0: int, m1: int, c0: int, c1: int, HT: Any, lm: Any, init: bool
    ) -> None:
        """``W[j + c, chunks] -= sum_m W[m, j + c] W[m, chunks]``, ``c < 4``, ``m0 <= m < m1``
        (``W [1, 1, R, C]``, C-ordered); with ``init`` the rows start from ``HT`` (the same
        shape) plus ``lm`` (a row pointer) on the diagonal (see :func:`_fold4`)."""
        _ck_tile(W, j, m0, m1, c0, c1)
        if CHECKED:
            if HT.shape != W.shape or HT.strides != W.strides or j + 4 > lm.n:
                raise IndexError("fastweights checked build: fold4 source out of range")
            _fold4(_base(W), W.shape[3], j, m0, m1, c0, c1, _base(HT), lm.ptr, init)
        else:
            _fold4(_base(W), W.shape[3], j, m0, m1, c0, c1, _base(HT), lm, init)

    @njit(inline="always")
    def factor4(W: Any, j: int, y: Any, idg: Any, c0: int, c1: int, one: float) -> None:
        """Factor columns ``j .. j+3`` of ``W [1, 1, R, C]`` and apply them to ``y`` (row
        pointers ``y`` and ``idg``; see :func:`_factor4`)."""
        _ck_tile(W, j, 0, 0, c0, c1)
        if CHECKED:
            _ck(y, c0, c1)
            if j % 4 != 0 or j < c0 * CW or j + 4 > (c0 + 1) * CW or j + 4 > idg.n:
                raise IndexError("fastweights checked build: factor4 block out of range")
            _factor4(_base(W), W.shape[3], j, y.ptr, idg.ptr, c0, c1, one)
        else:
            _factor4(_base(W), W.shape[3], j, y, idg, c0, c1, one)

    @njit(inline="always")
    def matvec(HT: Any, p: Any, ap: Any, lm: Any, c0: int, c1: int) -> None:
        """``ap = lm p + sum_c p[c] HT[c, :]`` on chunks ``[c0, c1)`` (``HT [1, 1, K, C]``,
        C-ordered; row pointers ``p``, ``ap``, ``lm``)."""
        K = HT.shape[2]
        if CHECKED:
            ok = c0 >= 0 and (c1 <= c0 or c1 * CW <= HT.shape[3])
            ok = ok and HT.strides[3] == HT.itemsize
            ok = ok and HT.strides[2] == HT.shape[3] * HT.itemsize
            if not ok:
                raise IndexError("fastweights checked build: matvec out of the matrix")
            _ck(ap, c0, c1)
            _ck(lm, c0, c1)
            _ck(p, c0, c1)
            if p.n < K:
                raise IndexError("fastweights checked build: matvec vector too short")
            _matvec(_base(HT), HT.shape[3], K, p.ptr, ap.ptr, lm.ptr, c0, c1)
        else:
            _matvec(_base(HT), HT.shape[3], K, p, ap, lm, c0, c1)

    @njit(inline="always")
    def dot4(W: Any, j: int, x: Any, c0: int, c1: int) -> Any:
        """``W[j + c, chunks] . x[chunks]`` for ``c < 4`` (``x`` a row pointer)."""
        _ck_tile(W, j, 0, 0, c0, c1)
        if CHECKED:
            _ck(x, c0, c1)
            return _dot4(_base(W), W.shape[3], j, x.ptr, c0, c1)
        return _dot4(_base(W), W.shape[3], j, x, c0, c1)


@_pass
def _update_h(HT: Array, KS: Array, BK: Array, K: int, a: float, reset: bool) -> None:
    """``HT = a HT + k (beta k)^T`` on its first ``K`` rows (``a`` ignored on a reset); the
    padding rows ``K <= c < KP`` stay rows of the identity."""
    prefer_512()
    nk = HT.shape[3] // CW
    ks = row(KS, 0, 0, 0, 0)
    bk = row(BK, 0, 0, 0, 0)
    for c in range(K):
        hc = row(HT, 0, 0, c, 0)
        hrow(hc, bk, hc, a, ks[c], a, c, reset, False, nk)


@_pass
def _cholesky(W: Array, HT: Array, LM: Array, Y: Array, ID: Array, one: float) -> None:
    """Factor ``A = H + Diag(lamb) = L L^T`` (``HT = H^T [KP, KP]``, padded with rows of the
    identity; ``LM`` = lamb) into ``W [KP, KP]``: row ``j`` of ``W`` becomes column ``j`` of
    ``L`` below the diagonal, zeros up to and on it; ``ID[j] = 1 / L[j, j]``. Solve ``L y =
    Y`` in place. ``one`` is 1 in the compute dtype (a float64 literal would promote float32
    work). The lower triangle of ``A`` by columns is the upper part of ``HT``'s rows.

    Left-looking by blocks of 4 columns: one register tile applies every earlier column to the
    block (:func:`fold4`, which also reads the block from ``HT`` on its first touch: no copy of
    the matrix), then the block's own 4 columns are factored one by one."""
    prefer_512()
    R = W.shape[2]
    nk = W.shape[3] // CW
    y = row(Y, 0, 0, 0, 0)
    idg = row(ID, 0, 0, 0, 0)
    lm = row(LM, 0, 0, 0, 0)
    for j in range(0, R, 4):
        j0 = j // CW
        # The previous block's columns (the earlier ones came in the last iteration); blocks 0
        # and 4 are read from HT here, the others by the fold of the last iteration.
        fold4(W, j, max(j - 4, 0), j, j0, nk, HT, lm, j <= 4)
        factor4(W, j, y, idg, j0, nk, one)
        if j > 0 and j + 4 < R:
            # The next block's update by every column before this block: independent of the
            # block just factored, so it overlaps that block's chain of square roots.
            fold4(W, j + 4, 0, j, (j + 4) // CW, nk, HT, lm, True)


@_pass
def _backsolve_read(
    W: Array,
    ID: Array,
    Y: Array,
    X: Array,
    GS: Array,
    BK: Array,
    VS: Array,
    OS: Array,
    a: float,
    reset: bool,
    zero: float,
) -> None:
    """``L^T x = y`` (``L`` from :func:`_cholesky`) into ``X`` by blocks of 4 rows from the
    bottom (:func:`dot4` of the rows with the known part of ``x``, then the block's triangle),
    fused with ``G = a G + (beta k) v^T`` row by row and ``OS = G^T x``."""
    prefer_512()
    R = W.shape[2]
    K = GS.shape[2]
    nk = W.shape[3] // CW
    nv = GS.shape[3] // CW
    x = row(X, 0, 0, 0, 0)
    y = row(Y, 0, 0, 0, 0)
    idg = row(ID, 0, 0, 0, 0)
    bk = row(BK, 0, 0, 0, 0)
    vs = row(VS, 0, 0, 0, 0)
    os_ = row(OS, 0, 0, 0, 0)
    for i in range(X.shape[3]):
        x[i] = zero
    for i in range(OS.shape[3]):
        os_[i] = zero
    for j in range(R - 4, -1, -4):
        s0, s1, s2, s3 = dot4(W, j, x, j // CW, nk)
        w0 = row(W, 0, 0, j, 0)
        w1 = row(W, 0, 0, j + 1, 0)
        w2 = row(W, 0, 0, j + 2, 0)
        x3 = (y[j + 3] - s3) * idg[j + 3]
        x2 = (y[j + 2] - s2 - w2[j + 3] * x3) * idg[j + 2]
        x1 = (y[j + 1] - s1 - w1[j + 2] * x2 - w1[j + 3] * x3) * idg[j + 1]
        x0 = (y[j] - s0 - w0[j + 1] * x1 - w0[j + 2] * x2 - w0[j + 3] * x3) * idg[j]
        x[j] = x0
        x[j + 1] = x1
        x[j + 2] = x2
        x[j + 3] = x3
        for c in range(j, min(j + 4, K)):
            gj = row(GS, 0, 0, c, 0)
            if reset:
                vscal_read(gj, vs, os_, bk[c], x[c], 0, nv)
            else:
                vaxpby_read(gj, vs, os_, a, bk[c], x[c], 0, nv)


@jit(nrt=False, noalias=True, reduce=True)
def _cg(
    HT: Array,
    LM: Array,
    QS: Array,
    X: Array,
    R: Array,
    P: Array,
    AP: Array,
    iterations: int,
    eps: float,
) -> None:
    """fla's conjugate gradient for ``(H + Diag(lamb)) x = q~`` into ``X`` (``HT = H^T``);
    ``eps`` is :data:`CG_EPS` in the compute dtype."""
    prefer_512()
    n = HT.shape[3]
    lm = row(LM, 0, 0, 0, 0)
    qs = row(QS, 0, 0, 0, 0)
    x = row(X, 0, 0, 0, 0)
    r = row(R, 0, 0, 0, 0)
    p = row(P, 0, 0, 0, 0)
    ap = row(AP, 0, 0, 0, 0)
    zero = eps - eps
    rr = zero
    for i in range(n):
        x[i] = zero
        r[i] = qs[i]
        p[i] = qs[i]
        rr += qs[i] * qs[i]
    for _ in range(iterations):
        matvec(HT, p, ap, lm, 0, n // CW)
        pap = zero
        for i in range(n):
            pap += p[i] * ap[i]
        alpha = rr / (pap + eps)
        rn = zero
        for i in range(n):
            x[i] += alpha * p[i]
            ri = r[i] - alpha * ap[i]
            r[i] = ri
            rn += ri * ri
        f = rn / (rr + eps)
        for i in range(n):
            p[i] = r[i] + f * p[i]
        rr = rn


@_pass
def _update_g_read(
    GS: Array, X: Array, BK: Array, VS: Array, OS: Array, a: float, reset: bool, zero: float
) -> None:
    """``G = a G + (beta k) v^T`` and ``OS = G^T x`` (the CG solver's step 3)."""
    prefer_512()
    nv = GS.shape[3] // CW
    x = row(X, 0, 0, 0, 0)
    bk = row(BK, 0, 0, 0, 0)
    vs = row(VS, 0, 0, 0, 0)
    os_ = row(OS, 0, 0, 0, 0)
    for i in range(OS.shape[3]):
        os_[i] = zero
    for j in range(GS.shape[2]):
        gj = row(GS, 0, 0, j, 0)
        if reset:
            vscal_read(gj, vs, os_, bk[j], x[j], 0, nv)
        else:
            vaxpby_read(gj, vs, os_, a, bk[j], x[j], 0, nv)


@jit(nrt=False, reduce=True)
def _prepare(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    bb: int,
    t: int,
    h: int,
    hv: int,
    l2norm: bool,
    KS: Array,
    BK: Array,
    QS: Array,
    VS: Array,
    C: Array,
) -> None:
    """The token's vectors: ``KS = k``, ``BK = beta k``, ``QS = q~``, ``VS = v`` (zero-padded).
    ``C = [1, eps, scale, ., .]`` in the compute dtype (``C[3:5]`` scratch)."""
    K = k.shape[3]
    V = v.shape[3]
    kr = row(k, bb, t, h, 0)
    qr = row(q, bb, t, h, 0)
    vr = row(v, bb, t, hv, 0)
    bt = row(beta, bb, t, hv, 0)[0]
    fk = C[0]
    fq = C[2]
    if l2norm:
        sk = C[0] - C[0]
        sq = sk
        for m in range(K):
            sk += kr[m] * kr[m]
            sq += qr[m] * qr[m]
        C[3] = 1.0 / np.sqrt(sk + L2NORM_EPS)  # as the first wave: the root in float64
        C[4] = C[2] / np.sqrt(sq + L2NORM_EPS)
        fk = C[3]
        fq = C[4]
    ks = row(KS, 0, 0, 0, 0)
    bk = row(BK, 0, 0, 0, 0)
    qs = row(QS, 0, 0, 0, 0)
    vs = row(VS, 0, 0, 0, 0)
    for m in range(K):
        km = kr[m] * fk
        ks[m] = km
        bk[m] = bt * km
        qs[m] = qr[m] * fq
    for m in range(V):
        vs[m] = vr[m]


@jit()
def _sweep(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    lamb: Array,
    h_in: Array,
    h_in_row: int,
    g_in: Array,
    g_in_row: int,
    h_out: Array,
    h_out_row: int,
    g_out: Array,
    g_out_row: int,
    o: Array,
    bb: int,
    t0: int,
    t1: int,
    hv: int,
    group: int,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
    exact: bool,
    iterations: int,
) -> None:
    """One (sequence, value head) from start to end."""
    dt = v.dtype
    K = k.shape[3]
    V = v.shape[3]
    h = hv // group
    KP = -(-K // CW) * CW
    VP = -(-V // CW) * CW
    # Scratch, carved from one allocation aligned to a cache line: HT, W, GS, then vectors.
    sizes = (KP * KP, KP * KP, K * VP, 11 * KP, 2 * VP)
    line = ALIGN // v.itemsize
    raw = np.zeros(sum(sizes) + line, dt)
    off = 0
    if line > 1:
        first = row(raw.reshape((1, 1, 1, raw.shape[0])), 0, 0, 0, 0)
        off = (-(address(first, 0) // v.itemsize)) % line
    buf = raw[off : off + sum(sizes)]
    # Every buffer as a 4-d array whose rows ``row(X, 0, 0, i, 0)`` are raw pointers: a
    # pointer index has no negative-index wrap-around, which kept LLVM from vectorising.
    HT = buf[: KP * KP].reshape((1, 1, KP, KP))
    p = KP * KP
    W = buf[p : p + KP * KP].reshape((1, 1, KP, KP))
    p += KP * KP
    GS = buf[p : p + K * VP].reshape((1, 1, K, VP))
    p += K * VP
    vec = buf[p : p + 11 * KP].reshape((11, 1, 1, 1, KP))
    KS, BK, QS, Y, X = vec[0], vec[1], vec[2], vec[3], vec[4]
    ID, LM, R, P, AP = vec[6], vec[7], vec[8], vec[9], vec[10]
    p += 11 * KP
    VS = buf[p : p + VP].reshape((1, 1, 1, VP))
    OS = buf[p + VP : p + 2 * VP].reshape((1, 1, 1, VP))
    C = np.empty(5, dt)
    C[0] = 1.0
    C[1] = CG_EPS
    C[2] = scale
    one = C[0]
    eps = C[1]
    zero = one - one
    for c in range(K, KP):  # HT's padding: rows of the identity (lamb is 0 there)
        row(HT, 0, 0, c, 0)[c] = one
    lr = row(lamb, 0, 0, hv, 0)
    lm = row(LM, 0, 0, 0, 0)
    for i in range(K):
        lm[i] = lr[i]
    if has_init:
        if K <= 64:
            for i in range(K):
                src = row(h_in, h_in_row, hv, i, 0)
                for c in range(K):
                    row(HT, 0, 0, c, 0)[i] = src[c]
        else:
            # H^T by 16 x 16 tiles once it no longer fits in L1: the plain transposing loop
            # took a decoding step at K = 128 from 0.7 to 1.05 ms for 16 heads.
            for i0 in range(0, K, CW):
                for c0 in range(0, K, CW):
                    for i in range(i0, min(i0 + CW, K)):
                        src = row(h_in, h_in_row, hv, i, 0)
                        for c in range(c0, min(c0 + CW, K)):
                            row(HT, 0, 0, c, 0)[i] = src[c]
        for i in range(K):
            gsrc = row(g_in, g_in_row, hv, i, 0)
            gi = row(GS, 0, 0, i, 0)
            for j in range(V):
                gi[j] = gsrc[j]
    y = row(Y, 0, 0, 0, 0)
    qs = row(QS, 0, 0, 0, 0)
    os_ = row(OS, 0, 0, 0, 0)
    for t in range(t0, t1):
        _prepare(q, k, v, beta, bb, t, h, hv, l2norm, KS, BK, QS, VS, C)
        gt = row(g, bb, t, hv, 0)[0]
        reset = gt == -np.inf
        a = np.exp(gt)
        _update_h(HT, KS, BK, K, a, reset)
        if exact:
            for i in range(KP):
                y[i] = qs[i]
            _cholesky(W, HT, LM, Y, ID, one)
            _backsolve_read(W, ID, Y, X, GS, BK, VS, OS, a, reset, zero)
        else:
            _cg(HT, LM, QS, X, R, P, AP, iterations, eps)
            _update_g_read(GS, X, BK, VS, OS, a, reset, zero)
        orow = row(o, bb, t, hv, 0)
        for j in range(V):
            orow[j] = os_[j]
    if not write_state:
        return
    if K <= 64:
        for i in range(K):
            dst = row(h_out, h_out_row, hv, i, 0)
            for c in range(K):
                dst[c] = row(HT, 0, 0, c, 0)[i]
    else:  # by tiles, as the initial state
        for i0 in range(0, K, CW):
            for c0 in range(0, K, CW):
                for i in range(i0, min(i0 + CW, K)):
                    dst = row(h_out, h_out_row, hv, i, 0)
                    for c in range(c0, min(c0 + CW, K)):
                        dst[c] = row(HT, 0, 0, c, 0)[i]
    for i in range(K):
        gdst = row(g_out, g_out_row, hv, i, 0)
        gi = row(GS, 0, 0, i, 0)
        for j in range(V):
            gdst[j] = gi[j]


@jit(parallel=True)
def mesa_kernel(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    lamb: Array,
    h_in: Array,
    g_in: Array,
    h_in_rows: Array,
    g_in_rows: Array,
    h_out: Array,
    g_out: Array,
    h_out_rows: Array,
    g_out_rows: Array,
    o: Array,
    seq_b: Array,
    seq_t0: Array,
    seq_t1: Array,
    task_seq: Array,
    task_hv: Array,
    group: int,
    has_init: bool,
    write_state: bool,
    l2norm: bool,
    scale: float,
    exact: bool,
    iterations: int,
) -> None:
    """Run every task ``(sequence, value head)`` of a call, in parallel.

    Arrays are in the compute dtype with contiguous last axes: ``q, k [B, T, H, K]``,
    ``v [B, T, HV, V]``, ``g, beta [B, T, HV, 1]``, ``lamb [1, 1, HV, K]``, states ``H [P, HV,
    K, K]``, ``G [P, HV, K, V]`` (rows ``*_rows`` per sequence; the pools themselves in a
    decoding step), ``o [B, T, HV, V]``.
    """
    for task in prange(task_seq.shape[0]):
        s = task_seq[task]
        _sweep(
            q, k, v, g, beta, lamb,
            h_in, h_in_rows[s], g_in, g_in_rows[s], h_out, h_out_rows[s], g_out, g_out_rows[s],
            o, seq_b[s], seq_t0[s], seq_t1[s], task_hv[task], group,
            has_init, write_state, l2norm, scale, exact, iterations,
        )  # fmt: skip


# ----------------------------------------------------------------------------- the driver


def _rows(x: Any, dt: np.dtype) -> np.ndarray:
    """``x`` in ``dt`` with a contiguous last axis (a view when it already is)."""
    x = np.asarray(x, dtype=dt)
    return x if unit_last(x) else np.ascontiguousarray(x)


def _task_list(lengths: np.ndarray, HV: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, value head) tasks, longest sequences first."""
    N = lengths.shape[0]
    seq = np.repeat(np.arange(N, dtype=np.int64), HV)
    hv = np.tile(np.arange(HV, dtype=np.int64), N)
    order = np.argsort(-lengths[seq], kind="stable")
    return seq[order], hv[order]


def _launch(
    call: Call,
    states_in: tuple[np.ndarray, np.ndarray] | None,
    rows_in: tuple[np.ndarray, np.ndarray],
    states_out: tuple[np.ndarray, np.ndarray] | None,
    rows_out: tuple[np.ndarray, np.ndarray],
    seq: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Run the kernel; ``o [B, T, HV, V]`` in the compute dtype."""
    dt = np.dtype(call.dtype)
    q, k, v = _rows(call.q, dt), _rows(call.k, dt), _rows(call.v, dt)
    g = _rows(call.g, dt)[..., None]
    beta = _rows(call.beta, dt)[..., None]
    lamb = _rows(call.lamb, dt)[None, None]
    seq_b, t0, t1 = seq
    ts, th = _task_list(t1 - t0, call.HV)
    n = min(int(plan(call)["threads"]), max(1, int(ts.shape[0])))
    o = np.empty((call.B, call.T, call.HV, call.V), dtype=dt)
    solver = call.options.get("solver", "exact")
    iterations = int(call.options.get("max_cg_iterations", 30))
    none = dummy(dt)
    h_in, g_in = (none, none) if states_in is None else states_in
    h_out, g_out = (none, none) if states_out is None else states_out
    with launch(n):
        call_kernel(
            mesa_kernel,
            q, k, v, g, beta, lamb,
            h_in, g_in, rows_in[0], rows_in[1], h_out, g_out, rows_out[0], rows_out[1],
            o, seq_b, t0, t1, ts, th, call.HV // call.H,
            states_in is not None, states_out is not None, bool(call.use_qk_l2norm),
            float(call.scale), solver == "exact", iterations,
        )  # fmt: skip
    return o


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a ``mesa_net`` sequence call (recurrent form); the final state
    is the pair ``(H [N, HV, K, K], G [N, HV, K, V])`` in the compute dtype."""
    dt = np.dtype(call.dtype)
    rows = np.arange(call.N, dtype=np.int64)
    init = None
    if call.initial_state is not None:
        init = (_rows(call.initial_state[0], dt), _rows(call.initial_state[1], dt))
    final = None
    if call.output_final_state:
        final = (
            np.empty((call.N, call.HV, call.K, call.K), dtype=dt),
            np.empty((call.N, call.HV, call.K, call.V), dtype=dt),
        )
    o = _launch(call, init, (rows, rows), final, (rows, rows), sequences(call))
    return o.astype(call.v.dtype, copy=False), final


def step(call: Call) -> tuple[Any, Any]:
    """One ``mesa_net`` decoding step; the pools ``(H, G)`` are updated in place through
    ``state_indices``.

    A pool of the compute dtype whose last axis is contiguous is read and written in place
    (each task reads its rows before it writes them); any other goes through a C-ordered copy
    of its rows, written back. Validation has refused read-only pools, repeated indices and
    copied inputs that view the pools.
    """
    dt = np.dtype(call.dtype)
    N = call.N
    rows = np.arange(N, dtype=np.int64) if call.state_indices is None else call.state_indices
    local = np.arange(N, dtype=np.int64)
    seq = (local, np.zeros(N, np.int64), np.ones(N, np.int64))
    pools = tuple(call.state_pool)
    states: list[np.ndarray] = []
    idx: list[np.ndarray] = []
    copied: list[bool] = []
    for pool in pools:
        direct = pool.dtype == dt and unit_last(pool)
        copied.append(not direct)
        if direct:
            states.append(pool)
            idx.append(rows)
        else:
            states.append(np.ascontiguousarray(np.asarray(pool)[rows], dtype=dt))
            idx.append(local)
    both = (states[0], states[1])
    o = _launch(call, both, (idx[0], idx[1]), both, (idx[0], idx[1]), seq)
    for pool, state, c in zip(pools, states, copied, strict=True):
        if c:
            pool[rows] = state
    return o[:, 0].astype(call.v.dtype, copy=False), call.state_pool
