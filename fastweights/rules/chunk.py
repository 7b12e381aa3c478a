"""Numerics shared by the chunk forms of every rule family.

Every decay factor is ``exp`` of a sum of gates over an interval, accumulated directly (forward
or reverse cumulative sums, segment sums), never as a difference of two cumulative sums: gates
of exactly 0 stay exact and nothing overflows when the cumulative decay inside a chunk is far
below -88. Zeros that stand for "no term" (the causal mask, the decay across a ``-inf`` gate)
are exact: such a term is selected away, never multiplied (``0 * nan`` would be NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from array_api_compat import device

from .._constants import SUB_BLOCK
from ._layout import pad_to_multiple


def _zero(xp: ModuleType, like: Any) -> Any:
    return xp.zeros((), dtype=like.dtype, device=device(like))


def _neg_inf(xp: ModuleType, like: Any) -> Any:
    return xp.asarray(-xp.inf, dtype=like.dtype, device=device(like))


def _mask(xp: ModuleType, n: int, like: Any, *, strict: bool, offset: int = 0) -> Any:
    """``[n, n]`` boolean: row r may see column s (``r > s`` if strict else ``r >= s``)."""
    r = xp.arange(n, device=device(like))[:, None] + offset
    s = xp.arange(n, device=device(like))[None, :]
    return r > s if strict else r >= s


@dataclass
class Gate:
    """A chunked log-decay ``[..., C, 1 or K]`` split for exact resets.

    ``finite`` is the gate with ``-inf`` replaced by 0 (NaN kept); ``resets`` counts the
    ``-inf`` gates of each channel in rows ``<= r`` and ``full`` those in every channel at
    once (``[..., C, 1]``). A count difference over an interval says whether it holds a reset.
    """

    finite: Any
    resets: Any
    full: Any


def split_gate(xp: ModuleType, g: Any) -> Gate:
    """The :class:`Gate` of a chunked log-decay ``g``."""
    reset = g == -xp.inf
    finite = xp.where(reset, _zero(xp, g), g)
    resets = xp.cumulative_sum(xp.astype(reset, g.dtype), axis=-2)
    everywhere = xp.all(reset, axis=-1, keepdims=True)
    full = xp.cumulative_sum(xp.astype(everywhere, g.dtype), axis=-2)
    return Gate(finite, resets, full)


def decay(xp: ModuleType, x: Any, log_f: Any) -> Any:
    """``x * exp(log_f)``, exactly 0 where ``log_f`` is ``-inf`` even if ``x`` is NaN or Inf."""
    cut = log_f == -xp.inf
    return xp.where(cut, _zero(xp, x), x * xp.exp(xp.where(cut, _zero(xp, log_f), log_f)))


def _all_finite(xp: ModuleType, Y: Any) -> bool:
    """Whether every entry of ``Y`` is finite; False when the values cannot be read (traced
    under ``jax.jit``), which takes the general path."""
    try:
        return bool(xp.all(xp.isfinite(Y)))
    except TypeError:  # jax's TracerBoolConversionError is a TypeError
        return False


def select_matmul(xp: ModuleType, X: Any, zero: Any, Y: Any) -> Any:
    """``X @ Y`` where the entries of ``X`` marked by ``zero`` are no terms at all.

    A marked entry contributes exactly 0, even against a NaN or Inf in ``Y``; everything else
    propagates as in a plain product. ``zero`` broadcasts against ``X``; a mask constant along
    the contraction (``[..., C, 1]``) just zeroes output rows.
    """
    X = xp.where(zero, _zero(xp, X), X)
    if zero.shape[-1] == 1:
        return xp.where(zero, _zero(xp, X), xp.matmul(X, Y))
    if _all_finite(xp, Y):
        return xp.matmul(X, Y)  # the usual case: the zeroed entries meet only finite values
    finite = xp.isfinite(Y)
    clean = xp.matmul(X, xp.where(finite, Y, _zero(xp, Y)))
    terms = xp.astype(xp.logical_not(zero), X.dtype)
    hits = xp.matmul(terms, xp.astype(xp.logical_not(finite), X.dtype))
    return xp.where(hits > 0, xp.matmul(X, Y), clean)


def _hidden(xp: ModuleType, gate: Gate | None, like: Any, *, strict: bool) -> Any:
    """``[..., C, C]`` boolean: pair ``(r, s)`` has no term (not visible, or a reset of every
    channel in ``(s, r]``)."""
    C = like.shape[-2]
    hidden = xp.logical_not(_mask(xp, C, like, strict=strict))
    if gate is None:
        return hidden
    full = gate.full[..., 0]
    return xp.logical_or(hidden, full[..., :, None] - full[..., None, :] > 0)


def _segment_sums(xp: ModuleType, g: Any, resets: Any, *, strict: bool) -> Any:
    """``[..., C, C, K]`` with ``sum_{s < u <= r} g_u`` where visible, ``-inf`` elsewhere.

    ``g`` (the finite part) and ``resets`` are ``[..., C, K]`` (``K`` may be 1). The sums are
    taken directly along the rows (the SSD "segsum"), not as differences of cumulative sums; an
    interval holding a reset of the channel is ``-inf``. With ``resets=None`` only the raw sums
    (the caller masks them).
    """
    C = g.shape[-2]
    u_gt_s = _mask(xp, C, g, strict=True)[:, :, None]  # [u, s, 1]
    terms = xp.where(u_gt_s, g[..., :, None, :], _zero(xp, g))  # [..., u, s, K]
    sums = xp.cumulative_sum(terms, axis=-3)  # over u <= r
    if resets is None:
        return sums
    crossed = resets[..., :, None, :] - resets[..., None, :, :] > 0
    keep = xp.logical_and(_mask(xp, C, g, strict=strict)[:, :, None], xp.logical_not(crossed))
    return xp.where(keep, sums, _neg_inf(xp, g))


def _reverse_exclusive_cumsum(xp: ModuleType, g: Any) -> Any:
    """``sum_{u > r} g_u`` along axis -2."""
    rev = xp.flip(xp.cumulative_sum(xp.flip(g, axis=-2), axis=-2), axis=-2)
    tail = xp.zeros((*g.shape[:-2], 1, g.shape[-1]), dtype=g.dtype, device=device(g))
    return xp.concat([rev[..., 1:, :], tail], axis=-2)


def decayed_scores(
    xp: ModuleType, X: Any, Y: Any, gate: Gate | None, *, strict: bool
) -> tuple[Any, Any]:
    """``M_rs = sum_i X_ri Y_si exp(sum_{s<u<=r} g_ui)`` for visible ``(r, s)``, else 0.

    ``X, Y: [..., C, K]``; ``gate`` per head (``[..., C, 1]``), per key channel or None.
    Returns ``M`` and the mask of pairs without a term (:func:`_hidden`), where ``M`` is 0.
    A per-channel decay cannot be factored out of the product as one matrix: row blocks of
    ``SUB_BLOCK`` use the block's first row as reference point, so both factors
    ``exp(b_r - b_ref)`` and ``exp(b_ref - b_s)`` are at most 1, and the diagonal blocks take
    the exponent elementwise.
    """
    hidden = _hidden(xp, gate, X, strict=strict)
    if gate is None or gate.finite.shape[-1] == 1:
        M = xp.matmul(X, xp.matrix_transpose(Y))
        if gate is not None:
            # Per head, the pairs across a reset are exactly the hidden ones.
            ss = _segment_sums(xp, gate.finite, None, strict=strict)[..., 0]
            M = M * xp.exp(xp.where(hidden, _zero(xp, ss), ss))
        return xp.where(hidden, _zero(xp, M), M), hidden
    g, resets = gate.finite, gate.resets
    C = X.shape[-2]
    rows = []
    for a0 in range(0, C, SUB_BLOCK):
        a1 = min(a0 + SUB_BLOCK, C)
        Xa, Ya = X[..., a0:a1, :], Y[..., a0:a1, :]
        ss = _segment_sums(xp, g[..., a0:a1, :], resets[..., a0:a1, :], strict=strict)
        pair = Xa[..., :, None, :] * Ya[..., None, :, :]  # [..., L, L, K]
        parts = [xp.sum(decay(xp, pair, ss), axis=-1)]
        if a0 > 0:
            ref = resets[..., a0 - 1 : a0, :]
            to_row = xp.cumulative_sum(g[..., a0:a1, :], axis=-2)  # sum_{a0 <= u <= r}
            to_row = xp.where(resets[..., a0:a1, :] - ref > 0, _neg_inf(xp, g), to_row)
            from_col = _reverse_exclusive_cumsum(xp, g[..., :a0, :])  # sum_{s < u < a0}
            from_col = xp.where(ref - resets[..., :a0, :] > 0, _neg_inf(xp, g), from_col)
            Yd = decay(xp, Y[..., :a0, :], from_col)
            off = select_matmul(
                xp, decay(xp, Xa, to_row), to_row == -xp.inf, xp.matrix_transpose(Yd)
            )
            parts.insert(0, off)
        if a1 < C:
            shape = (*parts[0].shape[:-1], C - a1)
            parts.append(xp.zeros(shape, dtype=X.dtype, device=device(X)))
        rows.append(xp.concat(parts, axis=-1))
    M = xp.concat(rows, axis=-2)
    return xp.where(hidden, _zero(xp, M), M), hidden


def solve_unit_lower(xp: ModuleType, A: Any, hidden: Any, R: Any) -> Any:
    """``X`` with ``(I + A) X = R`` for strictly lower-triangular ``A: [..., C, C]``.

    ``hidden`` marks the entries of ``A`` that are no terms (above the diagonal, across a
    reset): they never multiply a row of ``X``, so a NaN stays in the rows that depend on it.
    Blocked forward substitution: each block of rows first takes the products with the rows
    already solved, then its own small triangle by a column sweep. No inverse is formed.
    """
    C = A.shape[-1]
    solved = None
    for b0 in range(0, C, SUB_BLOCK):
        b1 = min(b0 + SUB_BLOCK, C)
        x = R[..., b0:b1, :]
        if solved is not None and hidden.ndim == 2:  # no gate: nothing hidden below the block
            x = x - xp.matmul(A[..., b0:b1, :b0], solved)
        elif solved is not None:
            x = x - select_matmul(xp, A[..., b0:b1, :b0], hidden[..., b0:b1, :b0], solved)
        Ab, Hb = A[..., b0:b1, b0:b1], hidden[..., b0:b1, b0:b1]
        for j in range(b1 - b0 - 1):
            # Column j of the block only touches rows below j, whose values are final.
            term = Ab[..., :, j : j + 1] * x[..., j : j + 1, :]
            x = x - xp.where(Hb[..., :, j : j + 1], _zero(xp, term), term)
        solved = x if solved is None else xp.concat([solved, x], axis=-2)
    return R if solved is None else solved


def _to_chunks(xp: ModuleType, x: Any, C: int) -> Any:
    """``[N, HV, R, D]`` -> ``[N, HV, ceil(R / C), C, D]``, zero-padded."""
    x = pad_to_multiple(xp, x, 2, C)
    return xp.reshape(x, (*x.shape[:2], x.shape[2] // C, C, x.shape[-1]))
