"""The recurrent form: the update rule itself, one step at a time (SPEC.md section 1).

This is the definition every other form is checked against. Per (sequence, head)::

    S' = Diag(exp(g_t)) S_{t-1}
    S_t = S' + k_t (beta_t * (v_t - erase * S'^T k_t))^T
    o_t = S_t^T q_t                       (q already scaled)
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ._layout import Problem


def recurrent(p: Problem) -> tuple[Any, Any]:
    """Run the general rule over all steps; returns ``(o [N, HV, R, V], final state)``.

    A gate of ``-inf`` resets the state (its rows, per key channel) to exactly zero before the
    step's write: the rows are selected away, not multiplied by ``exp(-inf) = 0``, so a NaN or
    Inf in them does not survive.
    """
    xp, S = p.xp, p.state
    alpha = reset = None
    if p.log_decay is not None:
        reset = p.log_decay == -xp.inf
        alpha = xp.exp(p.log_decay)
    zero = xp.zeros((), dtype=S.dtype, device=device(S))
    outputs = []
    for t in range(p.k.shape[2]):
        k_t = p.k[:, :, t, None, :]  # [N, HV, 1, K]
        if alpha is not None and reset is not None:
            # [N, HV, 1 or K] decays the rows (key channels) of S.
            S = xp.where(reset[:, :, t, :, None], zero, S * alpha[:, :, t, :, None])
        u = p.v[:, :, t, None, :]  # [N, HV, 1, V]
        if p.erase:
            u = p.beta[:, :, t, None, :] * (u - xp.matmul(k_t, S))
        S = S + xp.matmul(xp.matrix_transpose(k_t), u)
        outputs.append(xp.matmul(p.q[:, :, t, None, :], S))
    if not outputs:
        N, HV, _, V = p.v.shape
        return xp.zeros((N, HV, 0, V), dtype=S.dtype, device=device(S)), S
    return xp.concat(outputs, axis=2), S
