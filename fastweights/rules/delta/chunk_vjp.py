"""The chunk form's backward: the exact adjoint of :func:`.chunk.chunk`, chunk by chunk.

The forward, per chunk with incoming state ``S`` (``b`` the log-decay cumulated inside the
chunk, ``Gamma_rs = exp(b_r - b_s)``)::

    M   = K K^T * Gamma (strictly lower);  A = Diag(beta) M
    X   = [W, U] = (I + A)^-1 Diag(beta) [K * exp(b), V]      # Hebbian: W = 0, U = V
    U'  = U - W S
    O   = (Q * exp(b)) S + (Q K^T * Gamma) U'
    S  <- Diag(exp(b_C)) S + (K * exp(b_C - b))^T U'

The backward has three passes, the structure of fla's chunk backward:

1. Recompute the intra-chunk parts (scores, ``A``, the UT solve) for all chunks at once, and
   the states at the chunk boundaries by the forward's state recurrence: memory
   ``O(R/C K V)`` for the states, never one per step.
2. Sweep the chunks backwards carrying ``dS`` (the cotangent of the state after the chunk)::

       dU' = (Q K^T * Gamma)^T dO + (K * exp(b_C - b)) dS
       dS <- (Q * exp(b))^T dO + Diag(exp(b_C)) dS - W^T dU'

   only matrix products; the cotangents ``dU'`` and ``dS`` after every chunk are kept.
3. Everything else, for all chunks at once: the products' adjoints, the UT solve's adjoint as
   a triangular solve with the transpose (``dRHS = (I + A)^-T dX``, ``dA = -dRHS X^T`` on the
   strict lower triangle), the chain rule through ``A``, ``W``, ``U`` and the decays.

Gate gradients: every decay factor is ``exp`` of a sum of gates over an interval ``(s, r]``,
so its gradient reaches each gate in the interval. The parts are collected per row as the
gradient of the (finite) cumulative log-decay ``b_r`` and of ``b_C - b_r`` and ``b_C``, and
become the gates' gradient by a reverse cumulative sum, a forward exclusive cumulative sum and
a broadcast: never a difference of two cumulative sums of the gates themselves, and the decay
factors are those of the forward (``exp`` of interval sums; nothing overflows when the decay
inside a chunk is far below -88). A gate of ``-inf`` (a reset) is a term selected away in the
forward: every factor across it is exactly 0, no cotangent crosses it, and its own gradient
is exactly 0.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import device

from ..._constants import SUB_BLOCK
from ..chunk import (
    Gate,
    _neg_inf,
    _reverse_exclusive_cumsum,
    _segment_sums,
    _to_chunks,
    _zero,
    decay,
    decayed_scores,
    select_matmul,
    solve_unit_lower,
    split_gate,
)
from ._layout import Problem


def chunk_vjp(
    p: Problem, do: Any, dstate: Any, chunk_size: int, *, one_chunk: bool = False
) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final_state * dstate)`` for :func:`.chunk.chunk`.

    ``do: [N, HV, R, V]`` and ``dstate: [N, HV, K, V]`` are head-major like the problem;
    returns ``{"q", "k", "v", "log_decay", "beta", "state"}`` shaped as the problem's arrays
    (None for a part the problem lacks). ``one_chunk=True`` is the parallel form's backward.
    """
    xp = p.xp
    R, K = p.k.shape[2:]
    if dstate is None:
        dstate = xp.zeros_like(p.state)
    if R == 0:
        return _empty(p, dstate)
    C = R if one_chunk else min(chunk_size, R)
    q, k, v, dO = (_to_chunks(xp, x, C) for x in (p.q, p.k, p.v, do))
    raw_gate = None if p.log_decay is None else _to_chunks(xp, p.log_decay, C)
    gate = None if raw_gate is None else split_gate(xp, raw_gate)
    beta = None if p.beta is None or not p.erase else _to_chunks(xp, p.beta, C)
    nc = q.shape[2]

    # 1. The forward's intra-chunk parts, for all chunks at once (as in chunk.chunk).
    qd, kd = q, k
    from_start = to_end = total = None
    if gate is not None:
        inf = _neg_inf(xp, gate.finite)
        from_start = xp.cumulative_sum(gate.finite, axis=-2)
        from_start = xp.where(gate.resets > 0, inf, from_start)
        to_end = _reverse_exclusive_cumsum(xp, gate.finite)
        to_end = xp.where(gate.resets[..., -1:, :] - gate.resets > 0, inf, to_end)
        total = from_start[..., -1, :, None]  # [N, HV, nc, 1 or K, 1]
        qd, kd = decay(xp, q, from_start), decay(xp, k, to_end)
    scores, hidden = decayed_scores(xp, q, k, gate, strict=False)
    W = X = M = hidden_a = A = T_inv = k_start = None
    U = v
    if beta is not None:
        M, hidden_a = decayed_scores(xp, k, k, gate, strict=True)
        A = xp.where(hidden_a, _zero(xp, M), M * beta)
        k_start = k if from_start is None else decay(xp, k, from_start)
        rhs = xp.concat([beta * k_start, beta * v], axis=-1)
        if not one_chunk and rhs.shape[-1] > C:
            eye = xp.broadcast_to(xp.eye(C, dtype=A.dtype, device=device(A)), A.shape)
            T_inv = solve_unit_lower(xp, A, hidden_a, eye)
            X = select_matmul(xp, T_inv, hidden, rhs)
        else:
            X = solve_unit_lower(xp, A, hidden_a, rhs)
        W, U = X[..., :K], X[..., K:]

    # The states at the chunk boundaries and the pseudo-values U' (the forward's recurrence).
    w_zero = k_zero = None
    if gate is not None:
        first = gate.resets[..., :1, :] > 0
        full = gate.full > 0
        w_zero = full if first.shape[-1] == 1 else xp.logical_or(full, first)
        k_zero = to_end == -xp.inf
    states, pseudo = [], []
    S = p.state
    for c in range(nc):
        states.append(S)
        u = U[:, :, c, ...]
        if W is not None:
            if w_zero is None:
                u = u - xp.matmul(W[:, :, c, ...], S)
            else:
                u = u - select_matmul(xp, W[:, :, c, ...], w_zero[:, :, c, ...], S)
        pseudo.append(u)
        if c == nc - 1:
            break
        if k_zero is None or total is None:
            S = S + xp.matmul(xp.matrix_transpose(k[:, :, c, ...]), u)
            continue
        kdc, kz = xp.matrix_transpose(kd[:, :, c, ...]), k_zero[:, :, c, ...]
        if kz.shape[-1] == 1:
            write = xp.matmul(kdc, xp.where(kz, _zero(xp, u), u))
        else:
            write = select_matmul(xp, kdc, xp.matrix_transpose(kz), u)
        S = decay(xp, S, total[:, :, c, ...]) + write

    # 2. The reverse sweep over the chunks: the cotangents of U' and of the state after each.
    dS = dstate
    d_after: list[Any] = [None] * nc
    d_pseudo: list[Any] = [None] * nc
    for c in range(nc - 1, -1, -1):
        d_after[c] = dS
        do_c = dO[:, :, c, ...]
        du = xp.matmul(xp.matrix_transpose(scores[:, :, c, ...]), do_c)
        into_state = xp.matmul(kd[:, :, c, ...], dS)
        if k_zero is not None and k_zero.shape[-1] == 1:
            into_state = xp.where(k_zero[:, :, c, ...], _zero(xp, into_state), into_state)
        du = du + into_state
        d_pseudo[c] = du
        back = dS if total is None else decay(xp, dS, total[:, :, c, ...])
        dS = xp.matmul(xp.matrix_transpose(qd[:, :, c, ...]), do_c) + back
        if W is not None:
            dS = dS - xp.matmul(xp.matrix_transpose(W[:, :, c, ...]), du)
    out: dict[str, Any] = {"state": dS}

    # 3. Everything else, for all chunks at once.
    S_in, dS_out = xp.stack(states, axis=2), xp.stack(d_after, axis=2)
    Up, dUp = xp.stack(pseudo, axis=2), xp.stack(d_pseudo, axis=2)
    d_qd = xp.matmul(dO, xp.matrix_transpose(S_in))
    d_kd = xp.matmul(Up, xp.matrix_transpose(dS_out))
    if k_zero is not None and k_zero.shape[-1] == 1:
        d_kd = xp.where(k_zero, _zero(xp, d_kd), d_kd)
    d_scores = xp.matmul(dO, xp.matrix_transpose(Up))
    dq, dk = _decayed_scores_vjp(xp, d_scores, q, k, gate, hidden)
    d_b = None  # the gradient of the cumulative log-decay b_r, per row (and channel)
    if gate is not None:
        d_b = q * dq - k * dk + qd * d_qd
    if from_start is None or to_end is None:
        dq, dk = dq + d_qd, dk + d_kd
    else:
        dq = dq + decay(xp, d_qd, from_start)
        dk = dk + decay(xp, d_kd, to_end)
    if X is None or W is None or M is None or A is None or k_start is None or beta is None:
        dv = dUp
    else:
        dX = xp.concat([-xp.matmul(dUp, xp.matrix_transpose(S_in)), dUp], axis=-1)
        d_rhs = _solve_vjp(xp, A, hidden_a, T_inv, hidden, dX)
        dA = -xp.matmul(d_rhs, xp.matrix_transpose(X))
        dA = xp.where(hidden_a, _zero(xp, dA), dA)
        d_kb, d_vb = d_rhs[..., :K], d_rhs[..., K:]
        d_beta = (
            xp.sum(dA * M, axis=-1, keepdims=True)
            + xp.sum(d_kb * k_start, axis=-1, keepdims=True)
            + xp.sum(d_vb * v, axis=-1, keepdims=True)
        )
        out["beta"] = _unchunk(xp, d_beta, R)
        dv = beta * d_vb
        dk1, dk2 = _decayed_scores_vjp(xp, dA * beta, k, k, gate, hidden_a)
        d_kb = beta * d_kb
        dk = dk + dk1 + dk2
        dk = dk + (d_kb if from_start is None else decay(xp, d_kb, from_start))
        if d_b is not None:
            d_b = d_b + k * (dk1 - dk2) + k_start * d_kb
    out["q"], out["k"], out["v"] = (_unchunk(xp, x, R) for x in (dq, dk, dv))
    out["log_decay"] = None
    if raw_gate is not None and d_b is not None and total is not None and to_end is not None:
        d_to_end = kd * d_kd
        d_total = xp.sum(decay(xp, S_in, total) * dS_out, axis=-1)  # [N, HV, nc, K]
        if raw_gate.shape[-1] == 1:
            d_b = xp.sum(d_b, axis=-1, keepdims=True)
            d_to_end = xp.sum(d_to_end, axis=-1, keepdims=True)
            d_total = xp.sum(d_total, axis=-1, keepdims=True)
        # A gate g_u lies in b_r for r >= u, in b_C - b_r for r < u, and in b_C.
        dg = _reverse_cumsum(xp, d_b) + _exclusive_cumsum(xp, d_to_end) + d_total[..., None, :]
        dg = xp.where(raw_gate == -xp.inf, _zero(xp, dg), dg)
        out["log_decay"] = _unchunk(xp, dg, R)
    if p.beta is None:
        out["beta"] = None
    elif not p.erase:
        out["beta"] = xp.zeros_like(p.beta)
    return out


def _decayed_scores_vjp(
    xp: ModuleType, dM: Any, X: Any, Y: Any, gate: Gate | None, hidden: Any
) -> tuple[Any, Any]:
    """``(dX, dY)`` for ``M = decayed_scores(X, Y, gate)`` given ``dM`` (``hidden`` as returned
    by it: the pairs without a term, strict or not).

    ``dX_ri = sum_s dM_rs Y_si Gamma_rsi`` and ``dY_si = sum_r dM_rs X_ri Gamma_rsi``; the
    cumulative log-decay's gradient is then ``X * dX - Y * dY`` (per channel). Per key channel,
    row blocks of ``SUB_BLOCK`` as in the forward: the diagonal blocks take the decay
    elementwise, the blocks left of them factor it through the block's first row, both
    factors at most 1.
    """
    dM = xp.where(hidden, _zero(xp, dM), dM)
    if gate is not None and gate.finite.shape[-1] == 1:
        ss = _segment_sums(xp, gate.finite, None, strict=False)[..., 0]
        dM = dM * xp.exp(xp.where(hidden, _zero(xp, ss), ss))
        dM = xp.where(hidden, _zero(xp, dM), dM)
    if gate is None or gate.finite.shape[-1] == 1:
        return xp.matmul(dM, Y), xp.matmul(xp.matrix_transpose(dM), X)
    g, resets = gate.finite, gate.resets
    C = X.shape[-2]
    dX_rows = []
    dY = xp.zeros_like(Y)
    for a0 in range(0, C, SUB_BLOCK):
        a1 = min(a0 + SUB_BLOCK, C)
        Xa, Ya = X[..., a0:a1, :], Y[..., a0:a1, :]
        dMa = dM[..., a0:a1, a0:a1, None]
        # Visibility is already in dM (hidden pairs are 0); the sums only need the resets.
        ss = _segment_sums(xp, g[..., a0:a1, :], resets[..., a0:a1, :], strict=False)
        dXa = xp.sum(decay(xp, dMa * Ya[..., None, :, :], ss), axis=-2)
        dYa = xp.sum(decay(xp, dMa * Xa[..., :, None, :], ss), axis=-3)
        parts = [dYa]
        if a0 > 0:
            ref = resets[..., a0 - 1 : a0, :]
            to_row = xp.cumulative_sum(g[..., a0:a1, :], axis=-2)
            to_row = xp.where(resets[..., a0:a1, :] - ref > 0, _neg_inf(xp, g), to_row)
            from_col = _reverse_exclusive_cumsum(xp, g[..., :a0, :])
            from_col = xp.where(ref - resets[..., :a0, :] > 0, _neg_inf(xp, g), from_col)
            dMo = dM[..., a0:a1, :a0]
            dXa = dXa + decay(xp, xp.matmul(dMo, decay(xp, Y[..., :a0, :], from_col)), to_row)
            off = xp.matmul(xp.matrix_transpose(dMo), decay(xp, Xa, to_row))
            parts.insert(0, decay(xp, off, from_col))
        else:
            parts.insert(0, dYa[..., :0, :])
        if a1 < C:
            parts.append(xp.zeros_like(Y[..., a1:, :]))
        dX_rows.append(dXa)
        dY = dY + xp.concat(parts, axis=-2)
    return xp.concat(dX_rows, axis=-2), dY


def _solve_vjp(xp: ModuleType, A: Any, hidden_a: Any, T_inv: Any, hidden: Any, dX: Any) -> Any:
    """``(I + A)^-T dX``: the cotangent of the right-hand side of ``X = (I + A)^-1 RHS``.

    With the forward's inverse ``T_inv`` a product with its transpose; otherwise a backward
    substitution, written as the forward substitution of the reversed transposed system.
    """
    if T_inv is not None:
        hidden_t = xp.matrix_transpose(hidden)
        return select_matmul(xp, xp.matrix_transpose(T_inv), hidden_t, dX)

    def rev(x: Any) -> Any:
        return xp.flip(xp.flip(xp.matrix_transpose(x), axis=-1), axis=-2)

    solved = solve_unit_lower(xp, rev(A), rev(hidden_a), xp.flip(dX, axis=-2))
    return xp.flip(solved, axis=-2)


def _reverse_cumsum(xp: ModuleType, x: Any) -> Any:
    """``sum_{u >= r} x_u`` along axis -2."""
    return xp.flip(xp.cumulative_sum(xp.flip(x, axis=-2), axis=-2), axis=-2)


def _exclusive_cumsum(xp: ModuleType, x: Any) -> Any:
    """``sum_{u < r} x_u`` along axis -2."""
    head = xp.zeros_like(x[..., :1, :])
    return xp.concat([head, xp.cumulative_sum(x[..., :-1, :], axis=-2)], axis=-2)


def _unchunk(xp: ModuleType, x: Any, R: int) -> Any:
    """``[N, HV, nc, C, D]`` -> ``[N, HV, R, D]`` (the inverse of ``_to_chunks``)."""
    N, HV, nc, C, D = x.shape
    return xp.reshape(x, (N, HV, nc * C, D))[:, :, :R, :]


def _empty(p: Problem, dstate: Any) -> dict[str, Any]:
    """The gradients of an empty sequence: the state's cotangent passes through."""
    xp = p.xp
    return {
        "q": xp.zeros_like(p.q),
        "k": xp.zeros_like(p.k),
        "v": xp.zeros_like(p.v),
        "log_decay": None if p.log_decay is None else xp.zeros_like(p.log_decay),
        "beta": None if p.beta is None else xp.zeros_like(p.beta),
        "state": dstate,
    }
