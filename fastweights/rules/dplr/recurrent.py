"""The DPLR rule step by step: the definition the chunk form and every kernel are checked
against. Per (sequence, value head), with ``alpha_t = exp(gk_t)``::

    S_t = Diag(alpha_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = S_t^T q_t                       (q already scaled)

The decay and the low-rank term both act on the undecayed ``S_{t-1}``.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ._layout import Problem


def recurrent(p: Problem) -> tuple[Any, Any]:
    """``(o [N, HV, R, V], final state)`` of the DPLR rule over every step.

    A log-decay of ``-inf`` zeroes its key row of the decayed part exactly (selected, not
    multiplied by ``exp(-inf)``), so a NaN or Inf in that row does not survive it; the
    low-rank term still reads the whole old state.
    """
    xp, S = p.xp, p.state
    zero = xp.zeros((), dtype=S.dtype, device=device(S))
    alpha = reset = None
    if p.log_decay is not None:
        reset = p.log_decay == -xp.inf
        alpha = xp.exp(p.log_decay)
    outputs = []
    for t in range(p.k.shape[2]):
        read = xp.matmul(p.a[:, :, t, None, :], S)  # a_t^T S_{t-1}: [N, HV, 1, V]
        if alpha is not None and reset is not None:
            decayed = xp.where(reset[:, :, t, :, None], zero, S * alpha[:, :, t, :, None])
        else:
            decayed = S
        low_rank = xp.matrix_transpose(p.b[:, :, t, None, :]) * read
        write = xp.matrix_transpose(p.k[:, :, t, None, :]) * p.v[:, :, t, None, :]
        S = decayed + low_rank + write
        outputs.append(xp.matmul(p.q[:, :, t, None, :], S))
    if not outputs:
        N, HV, _, V = p.v.shape
        return xp.zeros((N, HV, 0, V), dtype=S.dtype, device=device(S)), S
    return xp.concat(outputs, axis=2), S
