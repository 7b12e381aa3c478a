"""MesaNet's chunk form: the states at every token of a chunk from matrix products, then one
batched solve for the chunk's tokens (RULES2.md section 3).

``H`` and ``G`` are sums decayed by a scalar per head, so within a chunk, with ``D_rs`` the
decay over ``(s, r]`` and ``c_r`` the decay from the chunk's start through ``r``::

    H_r = c_r H_[n] + sum_{s <= r} D_rs beta_s k_s k_s^T
    o_r = c_r G_[n]^T x_r + sum_{s <= r} D_rs beta_s (k_s . x_r) v_s

(``o`` is simple_gla's read-out with the query replaced by the solved ``x_r``). The exact
solve needs each ``H_r`` itself: ``O(K^2)`` per token to form, ``O(K^3)`` to factor. Decays
come from direct segment sums and ``-inf`` gates are selected away (:mod:`..chunk`).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ..chunk import _hidden, _segment_sums, decay, select_matmul, split_gate
from ._layout import Problem
from .solve import solve


def chunk(p: Problem, chunk_size: int) -> tuple[Any, tuple[Any, Any]]:
    """``(o [N, HV, T, V], (H, G))`` computed ``chunk_size`` tokens at a time."""
    xp, H, G = p.xp, p.H, p.G
    N, HV, T, K = p.k.shape
    outputs = []
    for c0 in range(0, T, chunk_size):
        c1 = min(c0 + chunk_size, T)
        L = c1 - c0
        q, k, v = p.q[:, :, c0:c1, :], p.k[:, :, c0:c1, :], p.v[:, :, c0:c1, :]
        gate = split_gate(xp, p.g[:, :, c0:c1, None])
        within = _segment_sums(xp, gate.finite, gate.resets, strict=False)[..., 0]
        # Pairs (r, s) with no term (s > r, or a reset in (s, r]) are selected away, never
        # multiplied by 0: a NaN or Inf at token s reaches no output before s.
        hidden = _hidden(xp, gate, q, strict=False)
        zero = xp.zeros((), dtype=within.dtype, device=device(within))
        weights = xp.where(hidden, zero, xp.exp(within) * p.beta[:, :, None, c0:c1])
        start = xp.cumulative_sum(gate.finite, axis=-2)  # log c_r, [N, HV, L, 1]
        cut = xp.asarray(-xp.inf, dtype=start.dtype, device=device(start))
        start = xp.where(gate.resets > 0, cut, start)
        outer = xp.reshape(k[..., :, None] * k[..., None, :], (N, HV, L, K * K))
        Hr = decay(xp, H[:, :, None, ...], start[..., None]) + xp.reshape(
            select_matmul(xp, weights, hidden, outer), (N, HV, L, K, K)
        )
        x = solve(xp, Hr + p.ridge[None, :, None, ...], q, p.solver, p.iterations)
        carried = select_matmul(xp, decay(xp, x, start), start == -xp.inf, G)
        scores = xp.where(hidden, zero, xp.matmul(x, xp.matrix_transpose(k)) * weights)
        outputs.append(carried + select_matmul(xp, scores, hidden, v))
        H = Hr[:, :, -1, ...]
        last = weights[:, :, -1, :, None]  # D_{L-1, s} beta_s
        written = select_matmul(
            xp, xp.matrix_transpose(k * last), hidden[:, :, -1:, :], v
        )  # tokens before a reset write nothing, even NaN
        G = decay(xp, G, start[:, :, -1, :, None]) + written
    if not outputs:
        V = p.v.shape[-1]
        return xp.zeros((N, HV, 0, V), dtype=G.dtype, device=device(G)), (H, G)
    return xp.concat(outputs, axis=2), (H, G)
