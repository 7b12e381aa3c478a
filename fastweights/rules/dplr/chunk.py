"""The DPLR rule's chunk form (WY/UT representation), in the Array API.

Per chunk of ``C`` rows with incoming state ``S`` (rows ``r, s`` inside the chunk, ``gk`` the
per-channel log-decay)::

    E[r,s]  = exp(sum_{s<j<=r} gk_j)       (r >= s)    decay from after s through r
    Ep[r,s] = exp(sum_{s<j<=r-1} gk_j)     (r > s)     ... through r-1 ("shift by one")
    E0[r]   = exp(sum_{j<=r} gk_j),   E0p[r] = exp(sum_{j<=r-1} gk_j)
    A_ab[r,s] = sum_i a_ri Ep[r,s,i] b_si,   A_ak[r,s] = sum_i a_ri Ep[r,s,i] k_si   (s < r)
    A_qk[r,s] = sum_i q_ri E[r,s,i] k_si,    A_qb[r,s] = sum_i q_ri E[r,s,i] b_si    (s <= r)
    U = (I - A_ab)^-1 ((A * E0p) S + A_ak V)            U_r = a_r^T S_{r-1}, the pseudo-values
    O = (Q * E0) S + A_qk V + A_qb U
    S <- Diag(E0[C]) S + (K * E[C,.])^T V + (B * E[C,.])^T U

Everything that does not depend on ``S`` is computed for all chunks at once (batched over a
chunk axis): the four score matrices, the unit lower-triangular solve, and

    T_W = (I - A_ab)^-1 (A * E0p),   T_V = (I - A_ab)^-1 A_ak V
    Q'  = Q * E0 + A_qb T_W,          P   = A_qk V + A_qb T_V

so that the sequential pass over the chunks is two matrix products per chunk:
``[U; O] = [T_W; Q'] S + [T_V; P]`` and ``S <- Diag(E0[C]) S + [K*E; B*E]^T [V; U]``.
Memory ``O(T (C + K + V) + K V)`` per head; no state per token or per chunk.

Numerics are those of the first wave's chunk form (:mod:`fastweights.rules.chunk`), whose
helpers this module uses: every decay is ``exp`` of a sum over an interval (never a difference
of prefix sums), per-channel scores are formed in sub-blocks with a reference point (no
overflow for decays of any strength), ``-inf`` log-decays are counted apart from the finite
part, and "no term" entries (causal mask, the decay across a ``-inf``) are selected away rather
than multiplied by 0, so a NaN or Inf at step ``t`` reaches no output before ``t``.

The "shift by one" of ``A_ab, A_ak`` (the rank-1 term reads ``S_{r-1}`` before step r's decay)
is taken by scoring ``a`` moved up one row -- row ``r'`` holds ``a_{r'+1}`` -- with the ordinary
decay over ``(s, r']`` and moving the result down one row: no exponent is ever divided out.
A ``-inf`` in ``gk`` zeroes only the diagonal path; the rank-1 path across it is in ``U``, and
the inverse ``(I - A_ab)^-1`` does not vanish across a reset (only its upper triangle is "no
term").

With ``gk`` None (``iplr``) no exponential is taken and nothing needs a reset mask. A ``gk``
equal across the key channels (a first-wave scalar gate as a DPLR instance) is run as one
log-decay per head: the scores are then plain products times a ``[C, C]`` decay.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import device

from ..chunk import (
    SUB_BLOCK,
    Gate,
    _to_chunks,
    decay,
    decayed_scores,
    select_matmul,
    solve_unit_lower,
    split_gate,
)
from ._layout import Problem


def _shift_up(xp: ModuleType, x: Any) -> Any:
    """Row ``r`` of each chunk takes row ``r + 1``; the last row is 0. ``x: [..., C, D]``."""
    tail = xp.zeros((*x.shape[:-2], 1, x.shape[-1]), dtype=x.dtype, device=device(x))
    return xp.concat([x[..., 1:, :], tail], axis=-2)


def _shift_down(xp: ModuleType, x: Any, fill: Any) -> Any:
    """Row ``r`` of each chunk takes row ``r - 1``; the first row is ``fill``."""
    head = xp.full((*x.shape[:-2], 1, x.shape[-1]), fill, dtype=x.dtype, device=device(x))
    return xp.concat([head, x[..., :-1, :]], axis=-2)


def _upper(xp: ModuleType, C: int, like: Any) -> Any:
    """``[C, C]`` boolean: ``s > r`` (no term in a lower-triangular matrix)."""
    r = xp.arange(C, device=device(like))[:, None]
    s = xp.arange(C, device=device(like))[None, :]
    return s > r


def _per_head(xp: ModuleType, gk: Any) -> Any:
    """``gk[..., :1]`` when every key channel has the same log-decay (a first-wave scalar gate
    mapped onto DPLR), so that the scores take :func:`decayed_scores`' per-head path (one
    product and a ``[C, C]`` decay instead of per-channel sub-blocks); else ``gk``. A NaN gate
    is never equal to itself, so it keeps the per-channel path; under tracing (jax.jit) the
    question cannot be answered and ``gk`` is kept."""
    if gk.shape[-1] == 1:
        return gk
    try:
        same = bool(xp.all(gk == gk[..., :1]))
    except TypeError:  # jax's TracerBoolConversionError is a TypeError
        return gk
    return gk[..., :1] if same else gk


PAIR_BUDGET = 1 << 22
"""Most entries of one ``[P, N, HV, chunks, 16, 16, K]`` product that :func:`decayed_scores`
forms for a per-channel gate (its peak memory is a few such temporaries); beyond it the chunks
are scored in groups."""


def _scores(xp: ModuleType, X: Any, Y: Any, gate: Gate | None) -> tuple[Any, Any]:
    """:func:`decayed_scores` (non-strict) of the stacked ``X, Y: [P, N, HV, nc, C, K]`` with
    one gate. A per-channel gate forms ``[P, N, HV, nc, 16, 16, K]`` products on the diagonal
    sub-blocks: beyond :data:`PAIR_BUDGET` entries the chunks go in groups, each still all at
    once, so the peak stays bounded while the gate's segment sums serve all ``P`` pairs."""
    P, N, HV, nc, C, K = X.shape
    L = min(C, SUB_BLOCK)
    per_chunk = P * N * HV * L * L * K
    group = max(1, PAIR_BUDGET // max(per_chunk, 1))
    if gate is None or gate.finite.shape[-1] == 1 or group >= nc:
        return decayed_scores(xp, X, Y, gate, strict=False)
    scores, hidden = [], []
    for c0 in range(0, nc, group):
        c1 = min(c0 + group, nc)
        part = Gate(*(x[:, :, c0:c1, ...] for x in (gate.finite, gate.resets, gate.full)))
        M, H = decayed_scores(
            xp, X[:, :, :, c0:c1, ...], Y[:, :, :, c0:c1, ...], part, strict=False
        )
        scores.append(M)
        hidden.append(H)
    return xp.concat(scores, axis=3), xp.concat(hidden, axis=2)


def chunk(p: Problem, chunk_size: int) -> tuple[Any, Any]:
    """Run the DPLR rule chunk by chunk; ``(o [N, HV, R, V], final state)`` as
    :func:`~fastweights.rules.dplr.recurrent.recurrent` returns them."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    xp = p.xp
    N, HV, R, K = p.k.shape
    V = p.v.shape[-1]
    S = p.state
    if R == 0:
        return xp.zeros((N, HV, 0, V), dtype=S.dtype, device=device(S)), S
    C = min(chunk_size, R)
    q, k, v, a, b = (_to_chunks(xp, x, C) for x in (p.q, p.k, p.v, p.a, p.b))
    nc = q.shape[2]
    a_next = _shift_up(xp, a)

    if p.log_decay is None:
        gate = None
        qd, ad, kd, bd, total = q, a, k, b, None
    else:
        gate = split_gate(xp, _to_chunks(xp, _per_head(xp, p.log_decay), C))
        inf = xp.asarray(-xp.inf, dtype=gate.finite.dtype, device=device(gate.finite))
        # log E0 (through r) and log E0p (through r - 1), -inf after a reset of the channel.
        from_start = xp.cumulative_sum(gate.finite, axis=-2)
        from_start = xp.where(gate.resets > 0, inf, from_start)
        before = _shift_down(xp, from_start, 0.0)
        # log E[C, s]: the decay after s through the chunk's end.
        rev = xp.flip(xp.cumulative_sum(xp.flip(gate.finite, axis=-2), axis=-2), axis=-2)
        to_end = _shift_up(xp, rev)
        to_end = xp.where(gate.resets[..., -1:, :] - gate.resets > 0, inf, to_end)
        total = from_start[..., -1, :, None]  # [N, HV, nc, K or 1, 1]
        qd, ad = decay(xp, q, from_start), decay(xp, a, before)
        kd, bd = decay(xp, k, to_end), decay(xp, b, to_end)

    # The four score matrices in one call, so that the gate's segment sums are formed once:
    # A_qk, A_qb, and a_{r'+1} against b_s, k_s with the decay over (s, r'] (r' >= s), moved
    # down one row to give A_ab, A_ak (s < r, decay over (s, r - 1]).
    X = xp.stack([q, q, a_next, a_next])
    Y = xp.stack([k, b, b, k])
    scores, hidden_q = _scores(xp, X, Y, gate)
    A_qk, A_qb = scores[0, ...], scores[1, ...]
    A_ab, A_ak = (_shift_down(xp, scores[i, ...], 0.0) for i in (2, 3))
    hidden_a = _shift_down(xp, hidden_q, True)

    # T_W = (I - A_ab)^-1 (A * E0p), T_V = (I - A_ab)^-1 A_ak V.
    AkV = select_matmul(xp, A_ak, hidden_a, v)
    rhs = xp.concat([ad, AkV], axis=-1)
    if rhs.shape[-1] > C:
        # Cheaper to solve for the C x C inverse and multiply. Its upper triangle is no term
        # (it may hold 0 * NaN from a NaN row of A_ab, which must not meet earlier rows).
        eye = xp.broadcast_to(xp.eye(C, dtype=A_ab.dtype, device=device(A_ab)), A_ab.shape)
        inverse = solve_unit_lower(xp, -A_ab, hidden_a, eye)
        X = select_matmul(xp, inverse, _upper(xp, C, A_ab), rhs)
    else:
        X = solve_unit_lower(xp, -A_ab, hidden_a, rhs)
    T_W, T_V = X[..., :K], X[..., K:]
    QbX = select_matmul(xp, A_qb, hidden_q, X)  # A_qb [T_W | T_V]
    Qp = qd + QbX[..., :K]
    P = select_matmul(xp, A_qk, hidden_q, v) + QbX[..., K:]

    # The sequential pass. Every product here is with a state that precedes every row of the
    # chunk, so plain products keep causality; a NaN in the state reaches every later output
    # in its column, as in the recurrent form (the rank-1 read a^T S sees the whole state).
    reads = xp.concat([T_W, Qp], axis=-2)  # [N, HV, nc, 2C, K]
    fixed = xp.concat([T_V, P], axis=-2)  # [N, HV, nc, 2C, V]
    writers = xp.matrix_transpose(xp.concat([kd, bd], axis=-2))  # [N, HV, nc, K, 2C]
    outputs = []
    for c in range(nc):
        UO = xp.matmul(reads[:, :, c, ...], S) + fixed[:, :, c, ...]
        U = UO[..., :C, :]
        outputs.append(UO[..., C:, :])
        write = xp.matmul(writers[:, :, c, ...], xp.concat([v[:, :, c, ...], U], axis=-2))
        if total is not None:
            S = decay(xp, S, total[:, :, c, ...])
        S = S + write
    return xp.concat(outputs, axis=2)[:, :, :R, :], S
