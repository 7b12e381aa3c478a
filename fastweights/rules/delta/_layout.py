"""A validated call of a first-wave rule as the general rule's head-major arrays, and back.

Packed sequences become a zero-padded batch: a padded step has ``k = v = 0``, gate 0 and beta
0, so it leaves the state unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..._constants import NORMALIZE_EPS
from .._layout import (
    _heads_first,
    _pad,
    _pad_index,
    cotangent_rows,
    heads_last,
    l2norm,
    qk_grads,
    tokens_first,
    unpad,
)

if TYPE_CHECKING:
    from ..._validate import Call


@dataclass
class Problem:
    """The general rule's inputs, head-major, for every op (see ``fastweights._ops``).

    ``q, k: [N, HV, R, K]``, ``v: [N, HV, R, V]`` with ``R`` steps (``T * n`` for
    DeltaProduct, interleaved; ``q`` is zero except at each token's last step);
    ``log_decay: [N, HV, R, 1 or K]`` or None; ``beta: [N, HV, R, 1 or V]`` or None (Hebbian);
    ``state: [N, HV, K, V]``.
    """

    xp: ModuleType
    q: Any
    k: Any
    v: Any
    log_decay: Any
    beta: Any
    state: Any
    erase: bool


def prepare(call: Call) -> tuple[Problem, Any]:
    """The general-rule problem for ``call`` and a function mapping results back.

    The returned ``finish(o, state)`` takes ``o: [N, HV, T', V]`` (T' padded token count) and
    the final state of the general rule, and returns ``(o, final_state)`` in the caller's layout.
    """
    xp, dt, dev = call.xp, call.dtype, call.device
    n, G = call.num_householder, call.HV // call.H

    def cast(x: Any) -> Any:
        return None if x is None else xp.astype(x, dt)

    q, k, v = cast(call.q), cast(call.k), cast(call.v)
    gate, beta = cast(call.gate), cast(call.beta)
    if call.use_qk_l2norm:
        q, k = l2norm(xp, q), l2norm(xp, k)
    q = q * call.scale
    if call.normalize:
        # The normaliser z_t = sum k is one more value column of ones.
        v = xp.concat([v, xp.ones((*v.shape[:-1], 1), dtype=dt, device=dev)], axis=-1)
    B, T = call.B, call.T
    if n > 1 or call.op == "delta_product":
        # Interleave: step j of token t is row t*n + j; decay before the first step,
        # read after the last.
        zeros_q = xp.zeros((B, T, n - 1, *q.shape[2:]), dtype=dt, device=dev)
        q = xp.reshape(xp.concat([zeros_q, q[:, :, None, ...]], axis=2), (B, T * n, *q.shape[2:]))
        if gate is not None:
            zeros_g = xp.zeros((B, T, n - 1, *gate.shape[2:]), dtype=dt, device=dev)
            gate = xp.concat([gate[:, :, None, ...], zeros_g], axis=2)
            gate = xp.reshape(gate, (B, T * n, *gate.shape[3:]))
    t_max = T
    if call.cu_seqlens is not None:
        idx, t_max = _pad_index(call.cu_seqlens, T, n)
        q, k, v = (_pad(xp, x, idx, dev) for x in (q, k, v))
        gate = None if gate is None else _pad(xp, gate, idx, dev)
        beta = None if beta is None else _pad(xp, beta, idx, dev)
    if G > 1:
        q, k = xp.repeat(q, G, axis=2), xp.repeat(k, G, axis=2)
    q, k, v = _heads_first(xp, q), _heads_first(xp, k), _heads_first(xp, v)
    if gate is not None:
        gate = _heads_first(xp, gate if gate.ndim == 4 else gate[..., None])
    if beta is not None:
        beta = _heads_first(xp, beta if beta.ndim == 4 else beta[..., None])
    state = _initial_state(call)

    def finish(o: Any, final: Any) -> tuple[Any, Any]:
        if n > 1 or call.op == "delta_product":
            o = o[:, :, n - 1 :: n, :]
        o = tokens_first(xp, o, call.cu_seqlens, t_max, dev)
        if call.normalize:
            o = o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)
        o = xp.astype(o, call.v.dtype)
        if not call.output_final_state:
            return o, None
        if call.normalize:
            return o, (final[..., :-1], final[..., -1])
        return o, final

    return Problem(xp, q, k, v, gate, beta, state, call.spec.erase), finish


def _initial_state(call: Call) -> Any:
    xp, dt = call.xp, call.dtype
    V = call.V + (1 if call.normalize else 0)
    if call.initial_state is None:
        return xp.zeros((call.N, call.HV, call.K, V), dtype=dt, device=call.device)
    if call.normalize:
        S, z = call.initial_state
        return xp.concat([xp.astype(S, dt), xp.astype(z, dt)[..., None]], axis=-1)
    return xp.astype(call.initial_state, dt)


def cotangents(call: Call, p: Problem, do: Any, dstate: Any, o_raw: Any) -> tuple[Any, Any]:
    """``(do, dstate)`` of the caller's layout as the general rule's head-major cotangents.

    ``o_raw`` is the general rule's output ``[N, HV, R, V + 1]``, needed only for
    ``normalize`` (the output is then ``o_raw[..., :V] / (o_raw[..., V] + eps)``).
    """
    xp, dt, dev = call.xp, call.dtype, call.device
    n = call.num_householder
    do_p = cotangent_rows(xp, xp.astype(do, dt), call.cu_seqlens, call.T, n, dev)
    if call.normalize:
        num, den = o_raw[..., :-1], o_raw[..., -1:] + NORMALIZE_EPS
        d_den = -xp.sum(do_p * num, axis=-1, keepdims=True) / (den * den)
        do_p = xp.concat([do_p / den, d_den], axis=-1)
    if dstate is None:
        return do_p, xp.zeros_like(p.state)
    if call.normalize:
        dS, dz = dstate
        return do_p, xp.concat([xp.astype(dS, dt), xp.astype(dz, dt)[..., None]], axis=-1)
    return do_p, xp.astype(dstate, dt)


def raw_grads(call: Call, g: dict[str, Any]) -> dict[str, Any]:
    """The gradients of the call's raw arguments from those of its :class:`Problem` ``g``:
    the adjoint of :func:`prepare` (padding, interleaving, grouped heads, scale, L2 norm,
    the normaliser column)."""
    xp, dev, n = call.xp, call.device, call.num_householder
    idx = None if call.cu_seqlens is None else _pad_index(call.cu_seqlens, call.T, n)[0]

    def back(x: Any) -> Any:
        x = heads_last(xp, x)
        return x if idx is None else unpad(xp, x, idx, call.T * n, dev)

    dq, dk = qk_grads(xp, call, back(g["q"]), back(g["k"]), slice(n - 1, None, n))
    out = {"q": dq, "k": dk}
    dv = back(g["v"])
    out["v"] = dv[..., :-1] if call.normalize else dv
    if call.gate is not None and call.spec.gate is not None:
        dg = back(g["log_decay"])[:, ::n, ...]
        out[call.spec.gate] = dg[..., 0] if call.gate.ndim == 3 else dg
    if call.beta is not None:
        db = back(g["beta"])
        out["beta"] = db[..., 0] if call.beta.ndim == 3 else db
    if call.initial_state is not None:
        dS = g["state"]
        out["initial_state"] = (dS[..., :-1], dS[..., -1]) if call.normalize else dS
    return out
