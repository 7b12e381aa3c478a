"""What one task of a Dask call computes, on plain (NumPy or CuPy) blocks, on a worker.

Each block runs as an ordinary call of the public op, so the backend that accepts the block
type runs it and the block is validated like any call. The scan over time blocks rests on one
fact about the rules with a :attr:`~fastweights.backends.Rule.transition`: the state after a
block is ``P S_in + S0`` and each output is ``o0_t + S_in^T c_t``, where ``S0`` and ``o0`` are
the block's results from a zero state and ``P``, ``c_t`` do not depend on the values. So a
block can run before the state entering it is known, and be corrected once it is.
"""

from __future__ import annotations

from typing import Any

import array_api_compat


def _op(name: str) -> Any:
    import fastweights

    return getattr(fastweights, name)


def sequence(op: str, options: dict[str, Any], arrays: dict[str, Any], state: Any) -> Any:
    """``(o, final_state)`` of one block from ``state`` (None: zeros)."""
    return _op(op)(**arrays, initial_state=state, output_final_state=True, **options)


def summary(
    op: str, options: dict[str, Any], arrays: dict[str, Any], dtype: Any, diagonal: bool
) -> Any:
    """``(o0, c, S0, P)`` of a block from a zero state, ``o0`` and ``c`` in ``dtype``.

    The block runs once with ``K`` more value columns that start as the identity and receive
    no values: those columns of the final state are the transition ``P`` (``[K, K]``; for a
    ``diagonal`` transition its diagonal, the off-diagonal entries being exactly zero), and
    those of the output are the ``c_t``. The block's own backend computes them all in one
    pass, at the speed of its kernel.
    """
    v = arrays["v"]
    xp = array_api_compat.array_namespace(v)
    dev = array_api_compat.device(v)
    N, HV, K, V = arrays["q"].shape[0], v.shape[2], arrays["q"].shape[3], v.shape[3]
    v = xp.astype(v, dtype)
    padded = xp.concat([v, xp.zeros((*v.shape[:-1], K), dtype=dtype, device=dev)], axis=-1)
    eye = xp.broadcast_to(xp.eye(K, dtype=dtype, device=dev), (N, HV, K, K))
    start = xp.concat([xp.zeros((N, HV, K, V), dtype=dtype, device=dev), eye], axis=-1)
    o, S = sequence(op, options, {**arrays, "v": padded}, start)
    P = S[..., V:]
    if diagonal:
        P = xp.sum(P * eye, axis=-1)
    return o[..., :V], o[..., V:], S[..., :V], P


def _times(P: Any, S: Any, diagonal: bool) -> Any:
    """``P S`` (``Diag(P) S`` if ``diagonal``) where a zero coefficient contributes exactly zero,
    also against a NaN or infinite entry of ``S``: a ``-inf`` gate (a decay of exactly 0) resets
    the state inside a block, and must clear a NaN that an earlier block left, as it does in
    one call. Finite ``S`` (the usual case) costs one product."""
    xp = array_api_compat.array_namespace(P, S)
    if diagonal:
        scaled = P[..., None] * S
        return scaled if bool(xp.all(xp.isfinite(S))) else xp.where(P[..., None] == 0, 0, scaled)
    if bool(xp.all(xp.isfinite(S))):
        return P @ S
    finite = xp.isfinite(S)
    zero = xp.zeros_like(S)
    out = P @ xp.where(finite, S, zero)

    def hits(a: Any, b: Any) -> Any:  # how many nonzero coefficients meet such entries
        return xp.astype(a, S.dtype) @ xp.astype(b, S.dtype) > 0

    pos, neg = xp.isinf(S) & (S > 0), xp.isinf(S) & (S < 0)
    nan = hits(P != 0, xp.isnan(S))
    up = hits(P > 0, pos) | hits(P < 0, neg)
    down = hits(P > 0, neg) | hits(P < 0, pos)
    out = xp.where(up, xp.inf, out)
    out = xp.where(down, -xp.inf, out)
    return xp.where(nan | (up & down), xp.nan, out)


def compose(later: tuple[Any, Any], earlier: tuple[Any, Any], diagonal: bool) -> Any:
    """The summary of two consecutive stretches: ``(P2 P1, P2 S1 + S2)``."""
    (P2, S2), (P1, S1) = later, earlier
    if diagonal:
        return _times(P2, P1[..., None], True)[..., 0], _times(P2, S1, True) + S2
    return _times(P2, P1, False), _times(P2, S1, False) + S2


def advance(summary: tuple[Any, Any], state: Any, diagonal: bool) -> Any:
    """The state after a stretch with this summary, from ``state``: ``P state + S0``."""
    P, S0 = summary
    return _times(P, state, diagonal) + S0


def correct(o0: Any, c: Any, state: Any, dtype: Any) -> Any:
    """The block's output from ``state``: ``o0_t + state^T c_t``, in ``dtype``."""
    xp = array_api_compat.array_namespace(o0)
    heads_first = xp.permute_dims(c, (0, 2, 1, 3))  # [N, HV, T, K]
    read = xp.permute_dims(_times(heads_first, state, False), (0, 2, 1, 3))  # [N, T, HV, V]
    return xp.astype(o0 + read, dtype)
