"""Gradients of the delta family on the numba backend: the chunk form's backward as kernels.

The math is :mod:`fastweights.rules.delta.chunk_vjp` (its docstring has the forward of one
chunk and the three passes of its backward); this is the same backward, fused per
(sequence, value head) and parallel over them (``prange``), with the dense products of a chunk
as BLAS calls (``np.dot`` on contiguous blocks) and the products with per-key-channel decays
as loops. Per head:

1. forward over the chunks: the decays, ``A``, the UT solve ``X = [W, U]`` (``(I + A)^-1``
   by forward substitution, then a product), ``U' = U - W S`` and the state recurrence; it
   keeps the state at every chunk boundary (``ceil(R / C)`` states), and ``X`` and ``U'`` per
   row (the size of the inputs, never a state per row);
2. backward over the chunks carrying ``dS`` (the cotangent of the state after the chunk): the
   chunk's scores are recomputed, then ``dU'``, the products' adjoints, the UT solve's adjoint
   as the product with ``(I + A)^-T``, the chain rule through ``A``, ``W``, ``U``
   and the decays, and ``dS <- (Q e^b)^T dO + e^{b_C} dS - W^T dU'``.

Decays: every factor is a product of the per-step decays ``alpha = exp(g)`` over an interval
(``Gamma_rs = alpha_r Gamma_{r-1,s}``), never a ratio of cumulative products and never the
exponential of a difference of cumulative sums, so nothing overflows and a gate of ``-inf``
gives an exact 0: no cotangent crosses it and its own gradient is set to exactly 0. Gate
gradients are collected per row as in the reference (the gradient of the cumulative
log-decay, of the decay to the chunk's end and of the chunk's total) and become the gates'
gradient by a reverse cumulative sum, an exclusive cumulative sum and a broadcast.

``recurrent_vjp`` is the same kernel: the forms compute the same function, and the chunkwise
backward (dense products) is the fast one on CPUs. A per-value ``beta`` has no kernel here
(:func:`rejects`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from ._jit import jit
from ._layout import launch, threads_for

Array = Any


@jit()
def _scores(X: Array, Y: Array, Gm: Array, m: int, strict: bool) -> Array:
    """``M_rs = sum_i X_ri Y_si Gamma_rsi`` for ``s <= r`` (``s < r`` when strict), else 0."""
    per_key = Gm.shape[2] != 1
    M = np.zeros((m, m), X.dtype)
    if not per_key:
        P = np.dot(X, Y.T)
        for r in range(m):
            top = r if strict else r + 1
            for s in range(top):
                M[r, s] = P[r, s] * Gm[r, s, 0]
        return M
    K = X.shape[1]
    for r in range(m):
        top = r if strict else r + 1
        for s in range(top):
            acc = 0.0
            for i in range(K):
                acc += X[r, i] * Y[s, i] * Gm[r, s, i]
            M[r, s] = acc
    return M


@jit()
def _scores_vjp(dM: Array, X: Array, Y: Array, Gm: Array, m: int, strict: bool) -> tuple:
    """``(dX, dY)`` for :func:`_scores` given ``dM`` (only its visible pairs are read)."""
    per_key = Gm.shape[2] != 1
    K = X.shape[1]
    if not per_key:
        D = np.zeros((m, m), X.dtype)
        for r in range(m):
            top = r if strict else r + 1
            for s in range(top):
                D[r, s] = dM[r, s] * Gm[r, s, 0]
        return np.dot(D, Y), np.dot(D.T, X)
    dX = np.zeros((m, K), X.dtype)
    dY = np.zeros((m, K), X.dtype)
    for r in range(m):
        top = r if strict else r + 1
        for s in range(top):
            d = dM[r, s]
            if d == 0.0:
                continue
            for i in range(K):
                gi = d * Gm[r, s, i]
                dX[r, i] += gi * Y[s, i]
                dY[s, i] += gi * X[r, i]
    return dX, dY


@jit()
def _decays(g: Array, m: int, Gm: Array, fs: Array, te: Array) -> None:
    """Per-step decays of one chunk as interval products: ``Gm[r, s] = prod_{s<u<=r} alpha_u``
    (``r >= s``), ``fs[r] = prod_{u<=r} alpha_u``, ``te[r] = prod_{r<u<m} alpha_u``."""
    Kg = g.shape[1]
    al = np.exp(g[:m])
    for i in range(Kg):
        prod = 1.0
        for r in range(m):
            prod = prod * al[r, i]
            fs[r, i] = prod
        prod = 1.0
        for r in range(m - 1, -1, -1):
            te[r, i] = prod
            prod = prod * al[r, i]
    for r in range(m):
        for i in range(Kg):
            Gm[r, r, i] = 1.0
        for s in range(r):
            for i in range(Kg):
                Gm[r, s, i] = Gm[r - 1, s, i] * al[r, i]


@jit()
def _inverse(Mk: Array, beta: Array, m: int) -> Array:
    """``(I + Diag(beta) Mk)^-1`` of a strictly lower ``Mk``, by forward substitution (unit
    lower triangular; its inverse is too)."""
    Ti = np.zeros((m, m), Mk.dtype)
    for r in range(m):
        Ti[r, r] = 1.0
        br = beta[r]
        for s in range(r):
            a = br * Mk[r, s]
            if a != 0.0:
                for j in range(s + 1):
                    Ti[r, j] -= a * Ti[s, j]
    return Ti


@jit()
def _scale(x: Array, f: Array, m: int) -> Array:
    """``x[:m] * f[:m]`` with ``f`` of one or ``x.shape[1]`` columns."""
    out = np.empty((m, x.shape[1]), x.dtype)
    per = f.shape[1] != 1
    for r in range(m):
        for i in range(x.shape[1]):
            out[r, i] = x[r, i] * f[r, i if per else 0]
    return out


@jit(parallel=True)
def _chunk_vjp(
    q, k, v, g, beta, S0, do, dS0, C, has_gate, erase, dq, dk, dv, dg, db, ckpt, Xs, Ups
):
    """The chunkwise backward for every head ``h`` of ``[NH, R, D]`` inputs (see the module)."""
    NH, R, K = k.shape
    V = v.shape[2]
    Kg = g.shape[2]
    per_key = Kg != 1
    nc = (R + C - 1) // C
    for h in prange(NH):
        dt = q.dtype
        Gm = np.empty((C, C, Kg), dt)
        fs = np.empty((C, Kg), dt)
        te = np.empty((C, Kg), dt)
        # 1. Forward over the chunks: boundary states, X and U' per row.
        S = S0[h].copy()
        for c in range(nc):
            t0 = c * C
            m = min(C, R - t0)
            ckpt[h, c] = S
            qc, kc, vc, gc = (
                q[h, t0 : t0 + m],
                k[h, t0 : t0 + m],
                v[h, t0 : t0 + m],
                g[h, t0 : t0 + m],
            )
            _decays(gc, m, Gm, fs, te)
            if erase:
                Mk = _scores(kc, kc, Gm, m, True)
                Ti = _inverse(Mk, beta[h, t0 : t0 + m], m)
                rhs = np.empty((m, K + V), dt)
                for r in range(m):
                    br = beta[h, t0 + r]
                    for i in range(K):
                        rhs[r, i] = br * kc[r, i] * fs[r, i if per_key else 0]
                    for j in range(V):
                        rhs[r, K + j] = br * vc[r, j]
                X = Xs[h, t0 : t0 + m]
                X[:, :] = np.dot(Ti, rhs)
                Up = Ups[h, t0 : t0 + m]
                Up[:, :] = X[:, K:] - np.dot(np.ascontiguousarray(X[:, :K]), S)
            else:
                Up = vc
            kd = _scale(kc, te, m)
            tot = fs[m - 1]
            for i in range(K):
                a = tot[i if per_key else 0]
                for j in range(V):
                    S[i, j] = a * S[i, j]
            S += np.dot(kd.T, np.ascontiguousarray(Up))
        # 2. Backward over the chunks.
        dS = dS0[h]
        for c in range(nc - 1, -1, -1):
            t0 = c * C
            m = min(C, R - t0)
            qc, kc, vc, gc = (
                q[h, t0 : t0 + m],
                k[h, t0 : t0 + m],
                v[h, t0 : t0 + m],
                g[h, t0 : t0 + m],
            )
            doc = do[h, t0 : t0 + m]
            Sin = ckpt[h, c]
            _decays(gc, m, Gm, fs, te)
            Up = Ups[h, t0 : t0 + m] if erase else vc
            P = _scores(qc, kc, Gm, m, False)
            qd = _scale(qc, fs, m)
            kd = _scale(kc, te, m)
            dUp = np.dot(P.T, doc) + np.dot(kd, dS)
            d_qd = np.dot(doc, Sin.T)
            d_kd = np.dot(Up, dS.T)
            d_sc = np.dot(doc, Up.T)
            dq_s, dk_s = _scores_vjp(d_sc, qc, kc, Gm, m, False)
            tot = fs[m - 1]
            d_tot = np.zeros(Kg, dt)
            for i in range(K):
                a = tot[i if per_key else 0]
                acc = 0.0
                for j in range(V):
                    acc += Sin[i, j] * dS[i, j]
                d_tot[i if per_key else 0] += a * acc
            dS_new = np.dot(qd.T, doc)
            for i in range(K):
                a = tot[i if per_key else 0]
                for j in range(V):
                    dS_new[i, j] += a * dS[i, j]
            dqc = dq_s + _scale(d_qd, fs, m)
            dkc = dk_s + _scale(d_kd, te, m)
            d_b = qc * dq_s - kc * dk_s + qd * d_qd
            if erase:
                X = Xs[h, t0 : t0 + m]
                dS_new -= np.dot(np.ascontiguousarray(X[:, :K]).T, dUp)
                Mk = _scores(kc, kc, Gm, m, True)
                # dX = [-dU' S^T, dU'], then (I + A)^-T dX by backward substitution.
                dX = np.empty((m, K + V), dt)
                dX[:, :K] = -np.dot(dUp, Sin.T)
                dX[:, K:] = dUp
                dR = np.dot(_inverse(Mk, beta[h, t0 : t0 + m], m).T, dX)
                dA = -np.dot(dR, X.T)
                ks = _scale(kc, fs, m)
                dMb = np.zeros((m, m), dt)
                for r in range(m):
                    br = beta[h, t0 + r]
                    acc = 0.0
                    for s in range(r):
                        acc += dA[r, s] * Mk[r, s]
                        dMb[r, s] = br * dA[r, s]
                    for i in range(K):
                        acc += dR[r, i] * ks[r, i]
                    for j in range(V):
                        acc += dR[r, K + j] * vc[r, j]
                    db[h, t0 + r] = acc
                    for j in range(V):
                        dv[h, t0 + r, j] = br * dR[r, K + j]
                    for i in range(K):
                        dR[r, i] = br * dR[r, i]  # d of the decayed keys k e^b
                dk1, dk2 = _scores_vjp(dMb, kc, kc, Gm, m, True)
                d_kb = dR[:, :K]
                dkc += dk1 + dk2 + _scale(np.ascontiguousarray(d_kb), fs, m)
                d_b += kc * (dk1 - dk2) + ks * d_kb
            else:
                dv[h, t0 : t0 + m] = dUp
            dq[h, t0 : t0 + m] = dqc
            dk[h, t0 : t0 + m] = dkc
            if has_gate:
                d_te = kd * d_kd
                # dg_u = sum_{r >= u} d_b_r + sum_{r < u} d_te_r + d_tot, 0 on -inf gates.
                for i in range(Kg):
                    rev = 0.0
                    for r in range(m - 1, -1, -1):
                        if per_key:
                            rev += d_b[r, i]
                        else:
                            for x in range(K):
                                rev += d_b[r, x]
                        dg[h, t0 + r, i] = rev
                    exc = 0.0
                    for r in range(m):
                        val = dg[h, t0 + r, i] + exc + d_tot[i]
                        dg[h, t0 + r, i] = 0.0 if gc[r, i] == -np.inf else val
                        if per_key:
                            exc += d_te[r, i]
                        else:
                            for x in range(K):
                                exc += d_te[r, x]
            dS = dS_new
        dS0[h] = dS


def rejects(p_beta: Any) -> str | None:
    """Why the kernel cannot take a problem's ``beta`` (per-value beta), or None."""
    if p_beta is not None and p_beta.shape[-1] != 1:
        return "a per-value beta has no gradient kernel here"
    return None


def chunk_vjp(
    p: Any, do: Any, dstate: Any, chunk_size: int, *, one_chunk: bool = False
) -> dict[str, Any]:
    """The delta family's chunkwise backward (same contract as
    :func:`fastweights.rules.delta.chunk_vjp.chunk_vjp`) on NumPy arrays."""
    N, HV, R, K = p.k.shape
    V = p.v.shape[-1]
    dt = np.dtype(p.state.dtype)
    NH = N * HV
    reason = rejects(p.beta if p.erase else None)
    if reason is not None:
        raise ValueError(reason)

    def flat(x: Any, width: int) -> Any:
        return np.ascontiguousarray(np.reshape(np.asarray(x), (NH, R, width)), dtype=dt)

    has_gate = p.log_decay is not None
    Kg = p.log_decay.shape[-1] if has_gate else 1
    erase = bool(p.erase)
    dS = np.array(np.reshape(np.asarray(dstate), (NH, K, V)), dtype=dt, order="C")
    shape = (N, HV, R)
    if R == 0:
        return {
            "q": np.zeros_like(p.q),
            "k": np.zeros_like(p.k),
            "v": np.zeros_like(p.v),
            "log_decay": None if not has_gate else np.zeros_like(p.log_decay),
            "beta": None if p.beta is None else np.zeros_like(p.beta),
            "state": dS.reshape(N, HV, K, V),
        }
    q, k, v, do_ = flat(p.q, K), flat(p.k, K), flat(p.v, V), flat(do, V)
    g = flat(p.log_decay, Kg) if has_gate else np.zeros((NH, R, 1), dt)
    beta = (
        np.ascontiguousarray(np.reshape(np.asarray(p.beta), (NH, R)), dtype=dt)
        if erase and p.beta is not None
        else np.ones((NH, R), dt)
    )
    S0 = np.ascontiguousarray(np.reshape(np.asarray(p.state), (NH, K, V)), dtype=dt)
    C = R if one_chunk else max(1, min(chunk_size, R))
    nc = (R + C - 1) // C
    dq, dk = np.empty((NH, R, K), dt), np.empty((NH, R, K), dt)
    dv = np.empty((NH, R, V), dt)
    dg = np.zeros((NH, R, Kg), dt)
    db = np.zeros((NH, R), dt)
    ckpt = np.empty((NH, nc, K, V), dt)
    Xs = np.empty((NH, R, K + V) if erase else (NH, 1, 1), dt)
    Ups = np.empty((NH, R, V) if erase else (NH, 1, 1), dt)
    with launch(threads_for(NH * R * K * V, NH)), _one_blas_thread():
        _chunk_vjp(q, k, v, g, beta, S0, do_, dS, C, has_gate, erase,
                   dq, dk, dv, dg, db, ckpt, Xs, Ups)  # fmt: skip
    out: dict[str, Any] = {
        "q": dq.reshape(*shape, K),
        "k": dk.reshape(*shape, K),
        "v": dv.reshape(*shape, V),
        "log_decay": dg.reshape(*shape, Kg) if has_gate else None,
        "beta": None,
        "state": dS.reshape(N, HV, K, V),
    }
    if p.beta is not None:
        out["beta"] = db.reshape(*shape, 1) if erase else np.zeros_like(p.beta)
    return out


def recurrent_vjp(p: Any, do: Any, dstate: Any, chunk_size: int, **_: Any) -> dict[str, Any]:
    """The recurrent form's gradient: the same function, by the chunkwise kernel."""
    return chunk_vjp(p, do, dstate, chunk_size)


class _one_blas_thread:
    """BLAS single-threaded during a launch: the kernel's threads make the BLAS calls."""

    def __enter__(self) -> None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover
            self._limit = None
            return
        self._limit = threadpool_limits(1, user_api="blas")

    def __exit__(self, *exc: object) -> None:
        if self._limit is not None:
            self._limit.restore_original_limits()
