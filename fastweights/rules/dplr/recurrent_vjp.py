"""The DPLR recurrent form's reverse sweep: the exact adjoint of :func:`.recurrent.recurrent`.

One step, per (sequence, value head), with ``D = Diag(alpha_t)`` (``alpha = exp(gk)``)::

    S' = D S_{t-1};   r = S_{t-1}^T a;   S_t = S' + b r^T + k v^T;   o_t = S_t^T q

and its adjoint, from ``Sbar = dL/dS_t`` (the final state's cotangent at the last step)::

    Sbar += q obar^T;   qbar = S_t obar;   kbar = Sbar v;   vbar = Sbar^T k
    w = Sbar^T b;       bbar = Sbar r;     abar = S_{t-1} w
    gkbar = sum_V Sbar * S';               Sbar_{t-1} = D Sbar + a w^T

The sweep needs ``S_{t-1}`` at every step. It keeps the state at chunk boundaries only (one
forward pass), and recomputes each chunk's states forward from its boundary when the reverse
sweep reaches it: memory ``O(R/C K V + C K V)`` per head, never a state per step, and the
recurrence is never run backwards by dividing out ``alpha``.

A log-decay of ``-inf`` selects its row of the decayed part to 0 in the forward (the low-rank
term still reads the old state): its gradient is 0, and no cotangent flows through the decayed
part of that row (only through ``a w^T``).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ._layout import Problem


def _step(p: Problem, S: Any, t: int, alpha: Any, reset: Any, zero: Any) -> tuple[Any, Any]:
    """``(S', S_t)`` of step ``t`` from ``S = S_{t-1}``, as :func:`.recurrent.recurrent`."""
    xp = p.xp
    read = xp.matmul(p.a[:, :, t, None, :], S)
    decayed = S
    if alpha is not None:
        decayed = xp.where(reset[:, :, t, :, None], zero, S * alpha[:, :, t, :, None])
    low_rank = xp.matrix_transpose(p.b[:, :, t, None, :]) * read
    write = xp.matrix_transpose(p.k[:, :, t, None, :]) * p.v[:, :, t, None, :]
    return decayed, decayed + low_rank + write


def recurrent_vjp(p: Problem, do: Any, dstate: Any, chunk_size: int) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final_state * dstate)`` for :func:`.recurrent.recurrent`.

    ``do: [N, HV, R, V]`` and ``dstate: [N, HV, K, V]`` are head-major like the problem;
    returns ``{"q", "k", "v", "a", "b", "log_decay", "state"}`` shaped as the problem's arrays
    (``log_decay`` None when the problem has no decay). ``chunk_size`` is the checkpoint
    interval.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    xp, R = p.xp, p.k.shape[2]
    zero = xp.zeros((), dtype=p.state.dtype, device=device(p.state))
    alpha = reset = None
    if p.log_decay is not None:
        reset = p.log_decay == -xp.inf
        alpha = xp.exp(p.log_decay)
    C = max(1, min(chunk_size, R))
    boundaries = [p.state]
    S = p.state
    for t in range(R):
        S = _step(p, S, t, alpha, reset, zero)[1]
        if (t + 1) % C == 0 and t + 1 < R:
            boundaries.append(S)
    dS = dstate
    names = ("q", "k", "v", "a", "b", "log_decay")
    grads: dict[str, list[Any]] = {n: [] for n in names}
    for c in range((R - 1) // C, -1, -1):
        start, stop = c * C, min(R, (c + 1) * C)
        states = [boundaries[c]]  # S_{t-1} for every step of the chunk, then the last S_t
        decayed_states = []
        for t in range(start, stop):
            decayed, S = _step(p, states[-1], t, alpha, reset, zero)
            decayed_states.append(decayed)
            states.append(S)
        for t in range(stop - 1, start - 1, -1):
            S_prev, S_t = states[t - start], states[t - start + 1]
            q_t, k_t = p.q[:, :, t, None, :], p.k[:, :, t, None, :]  # [N, HV, 1, K]
            a_t, b_t = p.a[:, :, t, None, :], p.b[:, :, t, None, :]
            v_t, do_t = p.v[:, :, t, None, :], do[:, :, t, None, :]  # [N, HV, 1, V]
            dS = dS + xp.matrix_transpose(q_t) * do_t
            grads["q"].append(xp.matmul(do_t, xp.matrix_transpose(S_t)))
            dSt = xp.matrix_transpose(dS)  # [N, HV, V, K]
            grads["k"].append(xp.matmul(v_t, dSt))  # (Sbar v)^T
            grads["v"].append(xp.matmul(k_t, dS))  # (Sbar^T k)^T
            read = xp.matmul(a_t, S_prev)  # r^T: [N, HV, 1, V]
            w = xp.matmul(b_t, dS)  # w^T = (Sbar^T b)^T: [N, HV, 1, V]
            grads["b"].append(xp.matmul(read, dSt))  # (Sbar r)^T
            grads["a"].append(xp.matmul(w, xp.matrix_transpose(S_prev)))  # (S_{t-1} w)^T
            through = dS
            if alpha is not None and reset is not None:
                dg = xp.sum(dS * decayed_states[t - start], axis=-1)  # [N, HV, K]
                grads["log_decay"].append(xp.where(reset[:, :, t, :], zero, dg)[:, :, None, :])
                through = xp.where(reset[:, :, t, :, None], zero, dS * alpha[:, :, t, :, None])
            dS = through + xp.matrix_transpose(a_t) * w
    out: dict[str, Any] = {"state": dS}
    for name in names:
        rows = grads[name]
        out[name] = xp.concat(rows[::-1], axis=2) if rows else None
    if R == 0:
        for name in ("q", "k", "v", "a", "b"):
            out[name] = xp.zeros_like(getattr(p, name))
        out["log_decay"] = None if p.log_decay is None else xp.zeros_like(p.log_decay)
    return out
