"""The Recurrent DeltaNet's gradient: the reverse sweep of :func:`.recurrent.recurrent`.

One step, per (sequence, head), from ``(S, l) = (S_{t-1}, o_{t-1})``::

    h = tanh(l);   qh = softmax(q_t + R_q h);   kh = softmax(k_t + R_k h)
    vh = v_t + R_v h;   b = sigmoid(beta_t + r_beta . h)
    e = vh - S^T kh;   S_t = S + kh (b e)^T;   o_t = scale S_t^T qh;   l_t = o_t

and its adjoint, from ``Sbar, lbar`` (the cotangents of ``S_t, l_t``; at the last step those
of the final state), with ``obar = do_t + lbar`` (``o_t`` is both an output and the next
step's input)::

    Sbar += scale qh obar^T;   qhbar = scale S_t obar
    khbar = Sbar (b e);   wbar = Sbar^T kh;   bbar = wbar . e;   ebar = b wbar
    vhbar = ebar;   Sbar_{t-1} = Sbar - kh ebar^T;   khbar -= S ebar
    zbar = s * (sbar - s . sbar) through each softmax s;   (beta_t)bar = bbar b (1 - b)
    R_qbar += (q_t)bar h^T  (R_k, R_v, r_beta alike, summed over sequences and steps)
    hbar = R_q^T (q_t)bar + R_k^T (k_t)bar + R_v^T vhbar + (beta_t)bar r_beta
    lbar_{t-1} = hbar (1 - h^2)

Memory: the pair ``(S, o_last)`` every ``call.chunk_size`` steps (64: the op takes no
``chunk_size``) from one forward pass, each chunk's steps recomputed from its boundary in the
reverse sweep; never a state per token for the whole sequence. The padding of packed
sequences leaves the state as it is: there the cotangents pass through unchanged and the
recurrent weights receive nothing.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from array_api_compat import device

from .._activations import sigmoid, softmax
from .._layout import cotangent_rows, tokens_first
from .recurrent import Problem, _times, prepare

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..._validate import Call


def _softmax_vjp(xp: ModuleType, s: Any, ds: Any) -> Any:
    return s * (ds - xp.sum(s * ds, axis=-1, keepdims=True))


def _outer_sum(xp: ModuleType, a: Any, b: Any) -> Any:
    """``sum_n a_n b_n^T``: ``[N, H, X], [N, H, Y] -> [H, X, Y]``."""
    return xp.sum(a[..., :, None] * b[..., None, :], axis=0)


def _forward(p: Problem, S: Any, last: Any, t: int) -> tuple[Any, ...]:
    """Step ``t`` from ``(S_{t-1}, o_{t-1})``, with what its adjoint reads (the forward's
    arithmetic)."""
    xp = p.xp
    h = xp.tanh(last)
    qh = softmax(xp, p.q[:, :, t, :] + _times(xp, p.R_q, h))
    kh = softmax(xp, p.k[:, :, t, :] + _times(xp, p.R_k, h))
    vh = p.v[:, :, t, :] + _times(xp, p.R_v, h)
    b = sigmoid(xp, p.beta[:, :, t] + xp.sum(p.r_beta * h, axis=-1))
    error = vh - xp.matmul(kh[..., None, :], S)[..., 0, :]
    new_S = S + kh[..., :, None] * (b[..., None] * error)[..., None, :]
    o = p.scale * xp.matmul(qh[..., None, :], new_S)[..., 0, :]
    if p.valid is not None:
        keep = p.valid[:, t, None, None]
        new_S, o = xp.where(keep[..., None], new_S, S), xp.where(keep, o, last)
    return h, qh, kh, b, error, new_S, o


def recurrent_vjp(p: Problem, do: Any, dstate: Any, chunk_size: int) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final * dstate)`` for :func:`.recurrent.recurrent`.

    ``do: [N, H, T, V]`` head-major, ``dstate = (dS, dlast)`` (arrays, zeros for none).
    Returns ``{"q", "k", "v", "beta", "R_q", "R_k", "R_v", "r_beta", "S", "last"}`` shaped as
    the problem's arrays.
    """
    xp, T = p.xp, p.q.shape[2]
    zero = xp.zeros((), dtype=p.S.dtype, device=device(p.S))
    C = max(1, min(chunk_size, T))
    boundaries = [(p.S, p.last)]
    S, last = p.S, p.last
    for t in range(T):
        S, last = _forward(p, S, last, t)[5:]
        if (t + 1) % C == 0 and t + 1 < T:
            boundaries.append((S, last))
    dS, dl = dstate
    rows: dict[str, list[Any]] = {"q": [], "k": [], "v": [], "beta": []}
    dR = {n: xp.zeros_like(getattr(p, n)) for n in ("R_q", "R_k", "R_v", "r_beta")}
    for c in range((T - 1) // C, -1, -1):
        start, stop = c * C, min(T, (c + 1) * C)
        before = []
        S, last = boundaries[c]
        for t in range(start, stop):
            before.append((S, last))
            S, last = _forward(p, S, last, t)[5:]
        for t in range(stop - 1, start - 1, -1):
            S, last = before[t - start]
            h, qh, kh, b, error, new_S, _ = _forward(p, S, last, t)
            dobar = do[:, :, t, :] + dl
            dSn = dS
            if p.valid is not None:  # padding: the step is the identity
                keep = p.valid[:, t, None, None]
                dobar, dSn = xp.where(keep, dobar, zero), xp.where(keep[..., None], dS, zero)
            dSn = dSn + p.scale * qh[..., :, None] * dobar[..., None, :]
            dqh = p.scale * xp.matmul(new_S, dobar[..., None])[..., 0]
            w = b[..., None] * error
            dkh = xp.matmul(dSn, w[..., None])[..., 0]
            dw = xp.matmul(kh[..., None, :], dSn)[..., 0, :]
            db = xp.sum(dw * error, axis=-1)
            de = b[..., None] * dw
            dS_prev = dSn - kh[..., :, None] * de[..., None, :]
            dkh = dkh - xp.matmul(S, de[..., None])[..., 0]
            dzq, dzk = _softmax_vjp(xp, qh, dqh), _softmax_vjp(xp, kh, dkh)
            dzb = db * b * (1 - b)
            dR["R_q"] = dR["R_q"] + _outer_sum(xp, dzq, h)
            dR["R_k"] = dR["R_k"] + _outer_sum(xp, dzk, h)
            dR["R_v"] = dR["R_v"] + _outer_sum(xp, de, h)
            dR["r_beta"] = dR["r_beta"] + xp.sum(dzb[..., None] * h, axis=0)
            dh = (
                xp.matmul(dzq[..., None, :], p.R_q)[..., 0, :]
                + xp.matmul(dzk[..., None, :], p.R_k)[..., 0, :]
                + xp.matmul(de[..., None, :], p.R_v)[..., 0, :]
                + dzb[..., None] * p.r_beta
            )
            dl_prev = dh * (1 - h * h)
            if p.valid is not None:
                keep = p.valid[:, t, None, None]
                dS_prev = xp.where(keep[..., None], dS_prev, dS)
                dl_prev = xp.where(keep, dl_prev, dl)
            dS, dl = dS_prev, dl_prev
            for name, value in (("q", dzq), ("k", dzk), ("v", de), ("beta", dzb)):
                rows[name].append(value)
    out: dict[str, Any] = {**dR, "S": dS, "last": dl}
    for name, parts in rows.items():
        like = getattr(p, name)
        out[name] = xp.stack(parts[::-1], axis=2) if parts else xp.zeros_like(like)
    return out


def vjp(
    call: Call,
    form: str,
    do: Any,
    dstate: Any,
    *,
    sweeps: Mapping[str, Callable[..., dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Gradients of ``L = sum(o * do) + sum(final * dstate)`` with respect to the raw
    arguments of a ``recurrent_delta_rule`` call: ``q, k, v, beta, R_q, R_k, R_v, r_beta``,
    and ``initial_state`` (the pair ``(dS_0, do_0)``) when the call has one, in the compute
    dtype. ``do`` is like ``o``, ``dstate`` a pair like the final state or None. The recurrent
    sweep (:func:`recurrent_vjp`, the only form) unless ``sweeps`` has one for ``form``.
    """
    xp, dt, dev = call.xp, call.dtype, call.device
    problem, _ = prepare(call)
    do = cotangent_rows(xp, xp.astype(do, dt), call.cu_seqlens, call.T, 1, dev)
    t_max = do.shape[2]
    if dstate is None:
        dstate = (xp.zeros_like(problem.S), xp.zeros_like(problem.last))
    else:
        dstate = tuple(xp.astype(x, dt) for x in dstate)
    sweep = (sweeps or {}).get(form, recurrent_vjp)
    d = sweep(problem, do, dstate, call.chunk_size)

    def back(x: Any) -> Any:  # [N, H, T', X] -> the caller's [B, T, H, X]
        return tokens_first(xp, x, call.cu_seqlens, t_max, dev)

    grads = {name: back(d[name]) for name in ("q", "k", "v")}
    grads["beta"] = back(d["beta"][..., None])[..., 0]
    grads.update({name: d[name] for name in ("R_q", "R_k", "R_v", "r_beta")})
    if call.initial_state is not None:
        grads["initial_state"] = (d["S"], d["last"])
    return grads
