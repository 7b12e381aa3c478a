"""The recurrent form's reverse sweep: the exact adjoint of :func:`.recurrent.recurrent`.

One step, per (sequence, value head), with ``D = Diag(alpha_t)`` (``alpha = exp(g)``)::

    S' = D S_{t-1};  e = v - S'^T k;  u = beta * e (delta rules) or u = v (Hebbian rules)
    S_t = S' + k u^T;  o_t = S_t^T q

and its adjoint, from ``Sbar = dL/dS_t`` (the final state's cotangent at the last step)::

    Sbar += q obar^T;   qbar = S_t obar;   kbar = Sbar u;   ubar = Sbar^T k
    Hebbian:  vbar = ubar;                 Sbar' = Sbar
    delta:    betabar = ubar * e;  vbar = beta * ubar;
              Sbar' = Sbar - k (beta * ubar)^T;  kbar -= S' (beta * ubar)
    gbar = sum_V Sbar' * S'   (a per-head gate also sums over K);   Sbar_{t-1} = D Sbar'

The sweep needs ``S_{t-1}`` at every step. It keeps the state at chunk boundaries only (one
forward pass), and recomputes each chunk's states forward from its boundary when the reverse
sweep reaches it: memory ``O(R/C K V + C K V)`` per head, never a state per step, and the
recurrence is never run backwards by dividing out ``alpha`` (unstable, impossible at a reset).

A gate of ``-inf`` resets its rows of the state (selected to 0 in the forward): its gradient is
0 and no cotangent flows through the reset rows to earlier steps.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ._layout import Problem


def _step(p: Problem, S: Any, t: int, alpha: Any, reset: Any, zero: Any) -> tuple[Any, Any]:
    """``(S', S_t)`` of step ``t`` from ``S = S_{t-1}``."""
    xp = p.xp
    decayed = S
    if alpha is not None:
        decayed = xp.where(reset[:, :, t, :, None], zero, S * alpha[:, :, t, :, None])
    k_t = p.k[:, :, t, None, :]
    u = p.v[:, :, t, None, :]
    if p.erase:
        u = p.beta[:, :, t, None, :] * (u - xp.matmul(k_t, decayed))
    return decayed, decayed + xp.matmul(xp.matrix_transpose(k_t), u)


def recurrent_vjp(p: Problem, do: Any, dstate: Any, chunk_size: int) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final_state * dstate)`` for :func:`.recurrent.recurrent`.

    ``do: [N, HV, R, V]`` and ``dstate: [N, HV, K, V]`` are head-major like the problem;
    returns ``{"q", "k", "v", "log_decay", "beta", "state"}`` shaped as the problem's arrays
    (None for a part the problem lacks). ``chunk_size`` is the checkpoint interval.
    """
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
    grads: dict[str, list[Any]] = {"q": [], "k": [], "v": [], "log_decay": [], "beta": []}
    per_head_gate = p.log_decay is not None and p.log_decay.shape[-1] == 1
    per_head_beta = p.beta is not None and p.beta.shape[-1] == 1
    for c in range((R - 1) // C, -1, -1):
        start, stop = c * C, min(R, (c + 1) * C)
        decayed_states = []
        S = boundaries[c]
        for t in range(start, stop):
            decayed, S = _step(p, S, t, alpha, reset, zero)
            decayed_states.append(decayed)
        for t in range(stop - 1, start - 1, -1):
            decayed = decayed_states[t - start]
            q_t, k_t = p.q[:, :, t, None, :], p.k[:, :, t, None, :]  # [N, HV, 1, K]
            do_t = do[:, :, t, None, :]  # [N, HV, 1, V]
            k_col = xp.matrix_transpose(k_t)
            v_t = p.v[:, :, t, None, :]
            if p.erase:
                e = v_t - xp.matmul(k_t, decayed)
                u = p.beta[:, :, t, None, :] * e
            else:
                u = v_t
            S_t = decayed + xp.matmul(k_col, u)
            dS = dS + xp.matrix_transpose(q_t) * do_t
            grads["q"].append(xp.matmul(do_t, xp.matrix_transpose(S_t)))
            dk = xp.matmul(u, xp.matrix_transpose(dS))  # (Sbar u)^T: [N, HV, 1, K]
            du = xp.matmul(k_t, dS)  # (Sbar^T k)^T: [N, HV, 1, V]
            if p.erase:
                beta_t = p.beta[:, :, t, None, :]
                db = du * e
                grads["beta"].append(xp.sum(db, axis=-1, keepdims=True) if per_head_beta else db)
                bu = beta_t * du
                grads["v"].append(bu)
                dS = dS - k_col * bu
                dk = dk - xp.matmul(bu, xp.matrix_transpose(decayed))
            else:
                grads["v"].append(du)
            grads["k"].append(dk)
            if alpha is not None and reset is not None:
                dg = xp.sum(dS * decayed, axis=-1)  # [N, HV, K]
                if per_head_gate:
                    dg = xp.sum(dg, axis=-1, keepdims=True)
                grads["log_decay"].append(xp.where(reset[:, :, t, :], zero, dg)[:, :, None, :])
                dS = xp.where(reset[:, :, t, :, None], zero, dS * alpha[:, :, t, :, None])
    out: dict[str, Any] = {"state": dS}
    for name, rows in grads.items():
        if not rows:
            out[name] = None
            continue
        out[name] = xp.concat(rows[::-1], axis=2)
    if R == 0:
        out["q"], out["k"], out["v"] = (xp.zeros_like(x) for x in (p.q, p.k, p.v))
        out["log_decay"] = None if p.log_decay is None else xp.zeros_like(p.log_decay)
        out["beta"] = None if p.beta is None or not p.erase else xp.zeros_like(p.beta)
    if not p.erase and p.beta is not None:
        out["beta"] = xp.zeros_like(p.beta)
    return out
