"""MesaNet step by step: the definition the chunk form and every kernel are checked against.
Per (sequence, value head)::

    H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T        G_t = exp(g_t) G_{t-1} + beta_t k_t v_t^T
    (H_t + Diag(lamb)) x_t = q_t                    o_t = G_t^T x_t       (q already scaled)
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ..chunk import decay
from ._layout import Problem
from .solve import solve


def recurrent(p: Problem) -> tuple[Any, tuple[Any, Any]]:
    """``(o [N, HV, T, V], (H, G))`` over every step. A ``-inf`` gate zeroes both states
    exactly (selected, not multiplied: a NaN in them does not survive it)."""
    xp, H, G = p.xp, p.H, p.G
    outputs = []
    for t in range(p.k.shape[2]):
        g = p.g[:, :, t, None, None]
        kb = p.beta[:, :, t, None] * p.k[:, :, t, :]
        H = decay(xp, H, g) + kb[..., :, None] * p.k[:, :, t, None, :]
        G = decay(xp, G, g) + kb[..., :, None] * p.v[:, :, t, None, :]
        x = solve(xp, H + p.ridge, p.q[:, :, t, :], p.solver, p.iterations)
        outputs.append(xp.matmul(x[..., None, :], G))
    if not outputs:
        N, HV, _, V = p.v.shape
        return xp.zeros((N, HV, 0, V), dtype=G.dtype, device=device(G)), (H, G)
    return xp.concat(outputs, axis=2), (H, G)
