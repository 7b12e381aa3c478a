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
cumulative sums. That keeps gates of exactly 0 exact, stays accurate when the cumulative decay
inside a chunk is far below -88, and turns a gate of ``-inf`` into an exact zero factor
instead of ``-inf - (-inf) = nan``.

Non-finite inputs propagate but, unlike in the recurrent form, not only forward in time: a NaN
or Inf in one row reaches every output of its chunk, because the masked-out (zero) scores
still multiply it (``0 * nan = nan``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import device

from ._layout import Problem, pad_to_multiple

SUB_BLOCK = 16
"""Rows per block of the per-channel decay scores and of the triangular solve."""


def _zero(xp: ModuleType, like: Any) -> Any:
    return xp.zeros((), dtype=like.dtype, device=device(like))


def _mask(xp: ModuleType, n: int, like: Any, *, strict: bool, offset: int = 0) -> Any:
    """``[n, n]`` boolean: row r may see column s (``r > s`` if strict else ``r >= s``)."""
    r = xp.arange(n, device=device(like))[:, None] + offset
    s = xp.arange(n, device=device(like))[None, :]
    return r > s if strict else r >= s


def _segment_sums(xp: ModuleType, g: Any, *, strict: bool) -> Any:
    """``[..., C, C, K]`` with ``sum_{s < u <= r} g_u`` where visible, ``-inf`` elsewhere.

    ``g`` is ``[..., C, K]`` (``K`` may be 1). The sums are taken
    directly along the rows (the SSD "segsum"), not as differences of cumulative sums.
    """
    C = g.shape[-2]
    u_gt_s = _mask(xp, C, g, strict=True)[:, :, None]  # [u, s, 1]
    terms = xp.where(u_gt_s, g[..., :, None, :], _zero(xp, g))  # [..., u, s, K]
    sums = xp.cumulative_sum(terms, axis=-3)  # over u <= r
    visible = _mask(xp, C, g, strict=strict)[:, :, None]
    return xp.where(visible, sums, xp.asarray(-xp.inf, dtype=g.dtype, device=device(g)))


def _reverse_exclusive_cumsum(xp: ModuleType, g: Any) -> Any:
    """``sum_{u > r} g_u`` along axis -2."""
    rev = xp.flip(xp.cumulative_sum(xp.flip(g, axis=-2), axis=-2), axis=-2)
    tail = xp.zeros((*g.shape[:-2], 1, g.shape[-1]), dtype=g.dtype, device=device(g))
    return xp.concat([rev[..., 1:, :], tail], axis=-2)


def decayed_scores(xp: ModuleType, X: Any, Y: Any, g: Any, *, strict: bool) -> Any:
    """``M_rs = sum_i X_ri Y_si exp(sum_{s<u<=r} g_ui)`` for visible ``(r, s)``, else 0.

    ``X, Y: [..., C, K]``; ``g: [..., C, 1]`` (per head), ``[..., C, K]`` (per key channel) or
    None. A per-channel decay cannot be factored out of the product as one matrix: row blocks
    of ``SUB_BLOCK`` use the block's first row as reference point, so both factors
    ``exp(b_r - b_ref)`` and ``exp(b_ref - b_s)`` are at most 1, and the diagonal blocks take
    the exponent elementwise.
    """
    if g is None or g.shape[-1] == 1:
        M = xp.matmul(X, xp.matrix_transpose(Y))
        if g is None:
            return xp.where(_mask(xp, M.shape[-1], M, strict=strict), M, _zero(xp, M))
        return M * xp.exp(_segment_sums(xp, g, strict=strict)[..., 0])
    C = X.shape[-2]
    rows = []
    for a0 in range(0, C, SUB_BLOCK):
        a1 = min(a0 + SUB_BLOCK, C)
        Xa, Ya, ga = X[..., a0:a1, :], Y[..., a0:a1, :], g[..., a0:a1, :]
        E = xp.exp(_segment_sums(xp, ga, strict=strict))  # [..., L, L, K]
        diag = xp.sum(Xa[..., :, None, :] * Ya[..., None, :, :] * E, axis=-1)
        parts = [diag]
        if a0 > 0:
            to_row = xp.exp(xp.cumulative_sum(ga, axis=-2))  # sum_{a0 <= u <= r}
            from_col = xp.exp(_reverse_exclusive_cumsum(xp, g[..., :a0, :]))  # sum_{s<u<a0}
            off = xp.matmul(Xa * to_row, xp.matrix_transpose(Y[..., :a0, :] * from_col))
            parts.insert(0, off)
        if a1 < C:
            parts.append(xp.zeros((*diag.shape[:-1], C - a1), dtype=X.dtype, device=device(X)))
        rows.append(xp.concat(parts, axis=-1))
    return xp.concat(rows, axis=-2)


def solve_unit_lower(xp: ModuleType, A: Any, R: Any) -> Any:
    """``X`` with ``(I + A) X = R`` for strictly lower-triangular ``A: [..., C, C]``.

    Blocked forward substitution: each block of rows first takes the products with the rows
    already solved, then its own small triangle by a column sweep. No inverse is formed.
    """
    C = A.shape[-1]
    solved = None
    for b0 in range(0, C, SUB_BLOCK):
        b1 = min(b0 + SUB_BLOCK, C)
        x = R[..., b0:b1, :]
        if solved is not None:
            x = x - xp.matmul(A[..., b0:b1, :b0], solved)
        Ab = A[..., b0:b1, b0:b1]
        for j in range(b1 - b0 - 1):
            # Column j of the block only touches rows below j, whose values are final.
            x = x - Ab[..., :, j : j + 1] * x[..., j : j + 1, :]
        solved = x if solved is None else xp.concat([solved, x], axis=-2)
    return R if solved is None else solved


def _to_chunks(xp: ModuleType, x: Any, C: int) -> Any:
    """``[N, HV, R, D]`` -> ``[N, HV, ceil(R / C), C, D]``, zero-padded."""
    x = pad_to_multiple(xp, x, 2, C)
    return xp.reshape(x, (*x.shape[:2], x.shape[2] // C, C, x.shape[-1]))


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
    g = None if p.log_decay is None else _to_chunks(xp, p.log_decay, C)
    beta = None if p.beta is None else _to_chunks(xp, p.beta, C)
    nc = q.shape[2]
    if g is None:
        q_decay = k_decay = total = None
    else:
        from_start = xp.cumulative_sum(g, axis=-2)
        q_decay = xp.exp(from_start)  # exp(b_r)
        k_decay = xp.exp(_reverse_exclusive_cumsum(xp, g))  # exp(b_C - b_r)
        total = q_decay[..., -1, :]  # exp(b_C), [N, HV, nc, 1 or K]
    scores = decayed_scores(xp, q, k, g, strict=False)
    qd = q if q_decay is None else q * q_decay
    kd = k if k_decay is None else k * k_decay
    W = None
    U = v
    if p.erase:
        A = decayed_scores(xp, k, k, g, strict=True) * beta
        kb = beta * (k if q_decay is None else k * q_decay)
        rhs = xp.concat([kb, beta * v], axis=-1)
        if not one_chunk and rhs.shape[-1] > C:
            # Cheaper to solve for the C x C inverse and multiply (SPEC's T = (I + A)^-1).
            eye = xp.eye(C, dtype=A.dtype, device=device(A))
            X = xp.matmul(solve_unit_lower(xp, A, xp.broadcast_to(eye, A.shape)), rhs)
        else:
            X = solve_unit_lower(xp, A, rhs)
        W, U = X[..., :K], X[..., K:]
    outputs = []
    for c in range(nc):
        u = U[:, :, c, ...] if W is None else U[:, :, c, ...] - xp.matmul(W[:, :, c, ...], S)
        outputs.append(xp.matmul(qd[:, :, c, ...], S) + xp.matmul(scores[:, :, c, ...], u))
        if total is not None:
            S = S * total[:, :, c, :, None]
        S = S + xp.matmul(xp.matrix_transpose(kd[:, :, c, ...]), u)
    return xp.concat(outputs, axis=2)[:, :, :R, :], S
