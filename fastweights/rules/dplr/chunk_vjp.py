"""The DPLR chunk form's reverse sweep: the exact adjoint of :func:`.chunk.chunk`, chunkwise.

The forward (see :mod:`.chunk`) computes, for every chunk at once, the four decayed score
matrices ``A_qk, A_qb`` (``s <= r``) and ``A_ab, A_ak`` (``s < r``, decay through ``r - 1``),
the unit lower-triangular solve ``X = [T_W | T_V] = (I - A_ab)^-1 [A * E0p | A_ak V]``,
``Q' = Q * E0 + A_qb T_W`` and ``P = A_qk V + A_qb T_V``; then, chunk after chunk::

    U = T_W S + T_V,   O = Q' S + P,   S <- Diag(E0[C]) S + (K * E[C,.])^T V + (B * E[C,.])^T U

The backward recomputes all of that except the states, then runs the chunks forward once more
to keep the state entering each chunk (``O(R/C K V)``, never a state per token), and sweeps them
backwards with two matrix products per chunk, from ``Sbar`` the cotangent of the state after
the chunk::

    Sbar_in = Diag(E0[C]) Sbar + (T_W^T (B * E[C,.])) Sbar + Q'^T Obar

Everything else is batched over the chunks, with the states and their cotangents stacked:
``Ubar = (B * E[C,.]) Sbar``, ``T_W bar = Ubar S^T``, ``Q' bar = Obar S^T``, then the adjoints
of the products above, of the solve (``Xbar`` gives ``Rbar = (I - A_ab)^-T Xbar``, a triangular
solve with the transpose, and ``A_ab bar = Rbar X^T`` on the strict lower triangle), and of the
decayed scores ``M_rs = sum_i X_ri Y_si E[r,s,i]``: ``Xbar = (Mbar * E) Y``,
``Ybar = (Mbar * E)^T X``, formed as the forward forms ``M`` (per-head decay: one ``[C, C]``
matrix; per channel: sub-blocks with a reference point, elementwise on the diagonal blocks), so
nothing overflows for decays of any strength.

The log-decay's gradient comes from the same pieces without differencing exponents: with
``G_r = sum_{j <= r} gk_j`` inside a chunk, every decay factor is ``exp(G_hi - G_lo)`` for an
interval, so a factor's cotangent times its value, ``x * xbar`` summed over the channel's
terms, goes to ``G_hi`` with ``+`` and to ``G_lo`` with ``-``; ``gkbar_j = sum_{r >= j} Gbar_r``
(a reverse cumulative sum in the chunk). A factor across a ``-inf`` is exactly 0, so it
contributes nothing; the gradient of a ``-inf`` log-decay is set to exactly 0.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import device

from ..chunk import (
    SUB_BLOCK,
    Gate,
    _reverse_exclusive_cumsum,
    _segment_sums,
    _to_chunks,
    decay,
    select_matmul,
    solve_unit_lower,
    split_gate,
)
from ._layout import Problem
from .chunk import PAIR_BUDGET, _per_head, _scores, _shift_down, _shift_up, _upper


def _zeros_rows(xp: ModuleType, like: Any, n: int) -> Any:
    """Zeros shaped as ``like`` with ``n`` rows (axis -2)."""
    return xp.zeros((*like.shape[:-2], n, like.shape[-1]), dtype=like.dtype, device=device(like))


def _channel_scores_vjp(xp: ModuleType, X: Any, Y: Any, gate: Gate, dM: Any) -> tuple[Any, Any]:
    """``(Xbar, Ybar)`` of ``M_rs = sum_i X_ri Y_si exp(sum_{s<u<=r} g_ui)`` (``r >= s``) with
    a per-channel gate, for the cotangent ``dM`` (0 on the pairs without a term), formed as
    :func:`~fastweights.rules.chunk.decayed_scores` forms ``M``: row blocks of ``SUB_BLOCK``
    with the block's first row as reference point, the diagonal blocks elementwise."""
    g, resets = gate.finite, gate.resets
    C = X.shape[-2]
    neg_inf = xp.asarray(-xp.inf, dtype=g.dtype, device=device(g))
    dX_rows = []
    dY = xp.zeros_like(Y)
    for a0 in range(0, C, SUB_BLOCK):
        a1 = min(a0 + SUB_BLOCK, C)
        Xa, Ya = X[..., a0:a1, :], Y[..., a0:a1, :]
        ss = _segment_sums(xp, g[..., a0:a1, :], resets[..., a0:a1, :], strict=False)
        W = decay(xp, dM[..., a0:a1, a0:a1, None], ss)  # [..., L, L, K]
        dXa = xp.sum(W * Ya[..., None, :, :], axis=-2)
        dYa = xp.sum(W * Xa[..., :, None, :], axis=-3)
        parts = [dYa]
        if a0 > 0:
            ref = resets[..., a0 - 1 : a0, :]
            to_row = xp.cumulative_sum(g[..., a0:a1, :], axis=-2)
            to_row = xp.where(resets[..., a0:a1, :] - ref > 0, neg_inf, to_row)
            from_col = _reverse_exclusive_cumsum(xp, g[..., :a0, :])
            from_col = xp.where(ref - resets[..., :a0, :] > 0, neg_inf, from_col)
            dMo = dM[..., a0:a1, :a0]
            Yd = decay(xp, Y[..., :a0, :], from_col)
            Xd = decay(xp, Xa, to_row)
            dXa = dXa + decay(xp, xp.matmul(dMo, Yd), to_row)
            parts.insert(0, decay(xp, xp.matmul(xp.matrix_transpose(dMo), Xd), from_col))
        if a1 < C:
            parts.append(_zeros_rows(xp, Y, C - a1))
        dY = dY + xp.concat(parts, axis=-2)
        dX_rows.append(dXa)
    return xp.concat(dX_rows, axis=-2), dY


def _scores_vjp(
    xp: ModuleType, X: Any, Y: Any, gate: Gate | None, dM: Any, hidden: Any
) -> tuple[Any, Any]:
    """``(Xbar, Ybar)`` of :func:`.chunk._scores` (non-strict) for the stacked ``X, Y: [P, N,
    HV, nc, C, K]`` and the cotangent ``dM`` of the scores; ``hidden`` marks the pairs without
    a term (their cotangent is dropped). Per-channel gates go in groups of chunks as the
    forward's, so the peak memory is the forward's."""
    zero = xp.zeros((), dtype=dM.dtype, device=device(dM))
    dM = xp.where(hidden, zero, dM)
    if gate is None or gate.finite.shape[-1] == 1:
        W = dM
        if gate is not None:
            ss = _segment_sums(xp, gate.finite, None, strict=False)[..., 0]
            W = xp.where(hidden, zero, W * xp.exp(xp.where(hidden, zero, ss)))
        return xp.matmul(W, Y), xp.matmul(xp.matrix_transpose(W), X)
    P, N, HV, nc, C, K = X.shape
    L = min(C, SUB_BLOCK)
    group = max(1, PAIR_BUDGET // max(P * N * HV * L * L * K, 1))
    dXs, dYs = [], []
    for c0 in range(0, nc, group):
        c1 = min(c0 + group, nc)
        part = Gate(*(x[:, :, c0:c1, ...] for x in (gate.finite, gate.resets, gate.full)))
        dX, dY = _channel_scores_vjp(
            xp, X[:, :, :, c0:c1, ...], Y[:, :, :, c0:c1, ...], part, dM[:, :, :, c0:c1, ...]
        )
        dXs.append(dX)
        dYs.append(dY)
    return xp.concat(dXs, axis=3), xp.concat(dYs, axis=3)


def _solve_transposed(xp: ModuleType, A: Any, hidden: Any, R: Any) -> Any:
    """``Y`` with ``(I + A)^T Y = R`` for strictly lower-triangular ``A``: the unit lower solve
    of the matrix reversed along both axes (a backward substitution)."""
    flip_A = xp.flip(xp.matrix_transpose(A), axis=(-2, -1))
    flip_H = xp.flip(xp.matrix_transpose(hidden), axis=(-2, -1))
    return xp.flip(solve_unit_lower(xp, flip_A, flip_H, xp.flip(R, axis=-2)), axis=-2)


def _from_chunks(xp: ModuleType, x: Any, R: int) -> Any:
    """``[N, HV, nc, C, D]`` -> ``[N, HV, R, D]`` (the padding dropped)."""
    N, HV, nc, C, D = x.shape
    return xp.reshape(x, (N, HV, nc * C, D))[:, :, :R, :]


def chunk_vjp(
    p: Problem, do: Any, dstate: Any, chunk_size: int, *, one_chunk: bool = False
) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final_state * dstate)`` for :func:`.chunk.chunk`.

    ``do: [N, HV, R, V]`` and ``dstate: [N, HV, K, V]`` are head-major like the problem;
    returns ``{"q", "k", "v", "a", "b", "log_decay", "state"}`` shaped as the problem's arrays
    (``log_decay`` None when the problem has no decay). The DPLR rule has no parallel form:
    ``one_chunk=True`` raises ValueError.
    """
    if one_chunk:
        raise ValueError("the dplr rule has no parallel (one-chunk) form")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    xp = p.xp
    R, K = p.k.shape[2:]
    if R == 0:
        out = {n: xp.zeros_like(getattr(p, n)) for n in ("q", "k", "v", "a", "b")}
        out["log_decay"] = None if p.log_decay is None else xp.zeros_like(p.log_decay)
        out["state"] = dstate
        return out
    C = min(chunk_size, R)
    q, k, v, a, b, dO = (_to_chunks(xp, x, C) for x in (p.q, p.k, p.v, p.a, p.b, do))
    nc = q.shape[2]
    a_next = _shift_up(xp, a)

    # The forward's intra-chunk pieces, as chunk.chunk forms them.
    gate: Gate | None = None
    from_start = before = to_end = total = None
    if p.log_decay is None:
        qd, ad, kd, bd = q, a, k, b
    else:
        gate = split_gate(xp, _to_chunks(xp, _per_head(xp, p.log_decay), C))
        inf = xp.asarray(-xp.inf, dtype=gate.finite.dtype, device=device(gate.finite))
        from_start = xp.cumulative_sum(gate.finite, axis=-2)
        from_start = xp.where(gate.resets > 0, inf, from_start)
        before = _shift_down(xp, from_start, 0.0)
        rev = xp.flip(xp.cumulative_sum(xp.flip(gate.finite, axis=-2), axis=-2), axis=-2)
        to_end = _shift_up(xp, rev)
        to_end = xp.where(gate.resets[..., -1:, :] - gate.resets > 0, inf, to_end)
        total = from_start[..., -1, :, None]  # [N, HV, nc, K or 1, 1]
        qd, ad = decay(xp, q, from_start), decay(xp, a, before)
        kd, bd = decay(xp, k, to_end), decay(xp, b, to_end)
    XS = xp.stack([q, q, a_next, a_next])
    YS = xp.stack([k, b, b, k])
    scores, hidden_q = _scores(xp, XS, YS, gate)
    A_qk, A_qb = scores[0, ...], scores[1, ...]
    A_ab, A_ak = (_shift_down(xp, scores[i, ...], 0.0) for i in (2, 3))
    hidden_a = _shift_down(xp, hidden_q, True)
    AkV = select_matmul(xp, A_ak, hidden_a, v)
    rhs = xp.concat([ad, AkV], axis=-1)
    inverse = None
    if rhs.shape[-1] > C:
        eye = xp.broadcast_to(xp.eye(C, dtype=A_ab.dtype, device=device(A_ab)), A_ab.shape)
        inverse = solve_unit_lower(xp, -A_ab, hidden_a, eye)
        X = select_matmul(xp, inverse, _upper(xp, C, A_ab), rhs)
    else:
        X = solve_unit_lower(xp, -A_ab, hidden_a, rhs)
    T_W, T_V = X[..., :K], X[..., K:]
    Qp = qd + select_matmul(xp, A_qb, hidden_q, T_W)

    # The states entering each chunk (the only states kept), then the reverse sweep.
    states = []
    S = p.state
    for c in range(nc):
        states.append(S)
        U_c = xp.matmul(T_W[:, :, c, ...], S) + T_V[:, :, c, ...]
        write = xp.matmul(xp.matrix_transpose(kd[:, :, c, ...]), v[:, :, c, ...])
        write = write + xp.matmul(xp.matrix_transpose(bd[:, :, c, ...]), U_c)
        if total is not None:
            S = decay(xp, S, total[:, :, c, ...])
        S = S + write
    S_in = xp.stack(states, axis=2)  # [N, HV, nc, K, V]
    del states
    through_U = xp.matmul(xp.matrix_transpose(T_W), bd)  # T_W^T (B * E): [N, HV, nc, K, K]
    through_O = xp.matmul(xp.matrix_transpose(Qp), dO)  # Q'^T Obar: [N, HV, nc, K, V]
    dS = dstate
    after: list[Any] = [None] * nc
    for c in range(nc - 1, -1, -1):
        after[c] = dS
        kept = dS if total is None else decay(xp, dS, total[:, :, c, ...])
        dS = kept + xp.matmul(through_U[:, :, c, ...], dS) + through_O[:, :, c, ...]
    dS_out = xp.stack(after, axis=2)  # the cotangent of the state after each chunk
    del after

    # Batched over the chunks: the state update and the outputs.
    U = xp.matmul(T_W, S_in) + T_V
    dS_out_t = xp.matrix_transpose(dS_out)
    dU = xp.matmul(bd, dS_out)
    dbd = xp.matmul(U, dS_out_t)
    dkd = xp.matmul(v, dS_out_t)
    dv = xp.matmul(kd, dS_out)
    S_in_t = xp.matrix_transpose(S_in)
    dQp = xp.matmul(dO, S_in_t)
    dX = xp.concat([xp.matmul(dU, S_in_t), dU], axis=-1)  # [T_W bar | T_V bar]

    # Q' = Q * E0 + A_qb T_W and P = A_qk V + A_qb T_V (P bar = O bar).
    dQP = xp.concat([dQp, dO], axis=-1)
    dA_qb = xp.matmul(dQP, xp.matrix_transpose(X))
    zero = xp.zeros((), dtype=dA_qb.dtype, device=device(dA_qb))
    dX = dX + xp.matmul(xp.matrix_transpose(xp.where(hidden_q, zero, A_qb)), dQP)
    dA_qk = xp.matmul(dO, xp.matrix_transpose(v))
    dv = dv + xp.matmul(xp.matrix_transpose(xp.where(hidden_q, zero, A_qk)), dO)

    # X = (I - A_ab)^-1 [A * E0p | A_ak V]: the adjoint solve with the transpose.
    if inverse is not None:
        lower = xp.matrix_transpose(_upper(xp, C, A_ab))
        drhs = select_matmul(xp, xp.matrix_transpose(inverse), lower, dX)
    else:
        drhs = _solve_transposed(xp, -A_ab, hidden_a, dX)
    dA_ab = xp.where(hidden_a, zero, xp.matmul(drhs, xp.matrix_transpose(X)))
    dad, dAkV = drhs[..., :K], drhs[..., K:]
    dA_ak = xp.where(hidden_a, zero, xp.matmul(dAkV, xp.matrix_transpose(v)))
    dv = dv + xp.matmul(xp.matrix_transpose(xp.where(hidden_a, zero, A_ak)), dAkV)

    # The four decayed scores (A_ab, A_ak are the scores of a_{r+1}, moved down one row).
    dM = xp.stack([dA_qk, dA_qb, _shift_up(xp, dA_ab), _shift_up(xp, dA_ak)])
    dXS, dYS = _scores_vjp(xp, XS, YS, gate, dM, hidden_q)
    dq = dXS[0, ...] + dXS[1, ...]
    dk = dYS[0, ...] + dYS[3, ...]
    db = dYS[1, ...] + dYS[2, ...]
    da = _shift_down(xp, dXS[2, ...] + dXS[3, ...], 0.0)

    dg = None
    if gate is None:
        dq, da, dk, db = dq + dQp, da + dad, dk + dkd, db + dbd
    else:
        assert from_start is not None and before is not None and to_end is not None
        assert total is not None
        dq = dq + decay(xp, dQp, from_start)
        da = da + decay(xp, dad, before)
        dk = dk + decay(xp, dkd, to_end)
        db = db + decay(xp, dbd, to_end)
        # Gbar_r: each decay factor exp(G_hi - G_lo) gives x * xbar to hi, minus it to lo.
        dG = xp.sum(XS * dXS - YS * dYS, axis=0)
        dG = dG + qd * dQp + _shift_up(xp, ad * dad)
        to_lo = kd * dkd + bd * dbd
        kept = xp.sum(dS_out * decay(xp, S_in, total), axis=-1)  # [N, HV, nc, K]
        last = xp.sum(to_lo, axis=-2, keepdims=True) + kept[..., None, :]
        dG = dG - to_lo + xp.concat([_zeros_rows(xp, dG, C - 1), last], axis=-2)
        dg = xp.flip(xp.cumulative_sum(xp.flip(dG, axis=-2), axis=-2), axis=-2)
        dg = _from_chunks(xp, dg, R)
        dg = xp.where(p.log_decay == -xp.inf, zero, dg)
    return {
        "q": _from_chunks(xp, dq, R),
        "k": _from_chunks(xp, dk, R),
        "v": _from_chunks(xp, dv, R),
        "a": _from_chunks(xp, da, R),
        "b": _from_chunks(xp, db, R),
        "log_decay": dg,
        "state": dS,
    }
