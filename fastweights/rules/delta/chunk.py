"""The chunk form (SPEC.md section 3) and the parallel form as its one-chunk case (section 2).

Per chunk of ``C`` steps with incoming state ``S`` (``b`` the log-decay cumulated inside the
chunk, ``Gamma_rs = exp(b_r - b_s)`` for ``r >= s``)::

    A   = tril(Diag(beta) (K K^T * Gamma), -1)          # delta family only
    W   = (I + A)^-1 Diag(beta) (K * exp(b))             # WY representation (UT transform)
    U   = (I + A)^-1 Diag(beta) V                        # Hebbian family: U = V, W = 0
    U'  = U - W S                                        # pseudo-values
    O   = (Q * exp(b)) S + (Q K^T * Gamma) U'
    S  <- Diag(exp(b_C)) S + (K * exp(b_C - b))^T U'

The intra-chunk parts are computed for all chunks at once with matrix products; only the
state passes sequentially from chunk to chunk, so memory is ``O(T (C + K + V) + K V)`` (the
scores of every chunk and one state), never a state per token or per chunk.

Numerics: every decay factor is ``exp`` of a sum of gates over an interval, accumulated
directly (forward or reverse cumulative sums, segment sums), never as a difference of two
cumulative sums. That keeps gates of exactly 0 exact and stays accurate when the cumulative
decay inside a chunk is far below -88.

Non-finite inputs propagate causally, as in the recurrent form (API.md). Zeros that stand for
"no term" -- the causal mask, and the decay across a ``-inf`` gate (a reset) -- are exact:
such a term is selected away, never multiplied (``0 * nan`` would be NaN). Resets are counted
separately from the finite part of the gates, so an interval holding a ``-inf`` has a log-decay
of exactly ``-inf`` even when it also holds a NaN gate.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ..chunk import (
    _neg_inf,
    _reverse_exclusive_cumsum,
    _to_chunks,
    _zero,
    decay,
    decayed_scores,
    select_matmul,
    solve_unit_lower,
    split_gate,
)
from ._layout import Problem


def chunk(p: Problem, chunk_size: int, *, one_chunk: bool = False) -> tuple[Any, Any]:
    """Run the general rule chunk by chunk; returns ``(o [N, HV, R, V], final state)``.

    ``one_chunk=True`` is the parallel form: the whole sequence is one chunk, so the output is
    the attention-like ``(Q K^T * D) (I + A)^-1 Diag(beta) V`` plus the initial state's part.
    """
    xp = p.xp
    N, HV, R, K = p.k.shape
    S = p.state
    if R == 0:
        return xp.zeros((N, HV, 0, p.v.shape[-1]), dtype=S.dtype, device=device(S)), S
    C = R if one_chunk else min(chunk_size, R)
    q, k, v = (_to_chunks(xp, x, C) for x in (p.q, p.k, p.v))
    gate = None if p.log_decay is None else split_gate(xp, _to_chunks(xp, p.log_decay, C))
    beta = None if p.beta is None else _to_chunks(xp, p.beta, C)
    nc = q.shape[2]
    qd, kd = q, k
    if gate is not None:
        inf = _neg_inf(xp, gate.finite)
        # exp(b_r), the decay from the chunk's start, and exp(b_C - b_r), to its end.
        from_start = xp.cumulative_sum(gate.finite, axis=-2)
        from_start = xp.where(gate.resets > 0, inf, from_start)
        to_end = _reverse_exclusive_cumsum(xp, gate.finite)
        to_end = xp.where(gate.resets[..., -1:, :] - gate.resets > 0, inf, to_end)
        total = from_start[..., -1, :, None]  # log exp(b_C), [N, HV, nc, 1 or K, 1]
        qd, kd = decay(xp, q, from_start), decay(xp, k, to_end)
    scores, hidden = decayed_scores(xp, q, k, gate, strict=False)
    W = None
    U = v
    if p.erase:
        A, hidden_a = decayed_scores(xp, k, k, gate, strict=True)
        A = A * beta
        A = xp.where(hidden_a, _zero(xp, A), A)
        kb = beta * (k if gate is None else decay(xp, k, from_start))
        rhs = xp.concat([kb, beta * v], axis=-1)
        if not one_chunk and rhs.shape[-1] > C:
            # Cheaper to solve for the C x C inverse and multiply (SPEC's T = (I + A)^-1).
            eye = xp.broadcast_to(xp.eye(C, dtype=A.dtype, device=device(A)), A.shape)
            X = select_matmul(xp, solve_unit_lower(xp, A, hidden_a, eye), hidden, rhs)
        else:
            X = solve_unit_lower(xp, A, hidden_a, rhs)
        W, U = X[..., :K], X[..., K:]
    outputs = []
    for c in range(nc):
        u = U[:, :, c, ...]
        if W is not None:
            if gate is None:
                u = u - xp.matmul(W[:, :, c, ...], S)
            else:
                # W's row r has no term from S's row i after a reset of every channel up to
                # r, or of channel i at the chunk's first row.
                full = gate.full[:, :, c, ...] > 0
                first = gate.resets[:, :, c, :1, :] > 0
                w_zero = full if first.shape[-1] == 1 else xp.logical_or(full, first)
                u = u - select_matmul(xp, W[:, :, c, ...], w_zero, S)
        if gate is None:
            o = xp.matmul(q[:, :, c, ...], S)
            write = xp.matmul(xp.matrix_transpose(k[:, :, c, ...]), u)
        else:
            q_zero = from_start[:, :, c, ...] == -xp.inf
            o = select_matmul(xp, qd[:, :, c, ...], q_zero, S)
            k_zero = to_end[:, :, c, ...] == -xp.inf
            kdc = xp.matrix_transpose(kd[:, :, c, ...])
            if k_zero.shape[-1] == 1:  # per head: drop the rows before a reset
                write = xp.matmul(kdc, xp.where(k_zero, _zero(xp, u), u))
            else:
                write = select_matmul(xp, kdc, xp.matrix_transpose(k_zero), u)
            S = decay(xp, S, total[:, :, c, ...])
        hidden_c = hidden if hidden.ndim == 2 else hidden[:, :, c, ...]
        o = o + select_matmul(xp, scores[:, :, c, ...], hidden_c, u)
        outputs.append(o)
        S = S + write
    return xp.concat(outputs, axis=2)[:, :, :R, :], S
