"""The Recurrent DeltaNet step by step, on head-major arrays (the definition every kernel is
checked against)."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from array_api_compat import device

from .._activations import sigmoid, softmax
from .._layout import _heads_first, _pad, _pad_index, tokens_first

if TYPE_CHECKING:
    from ..._validate import Call


@dataclass
class Problem:
    """``q, k: [N, H, T, K]``, ``v: [N, H, T, V]``, ``beta: [N, H, T]`` (logits),
    ``R_q, R_k: [H, K, V]``, ``R_v: [H, V, V]``, ``r_beta: [H, V]``, the state
    ``S: [N, H, K, V]`` and ``last: [N, H, V]``, ``scale``, and ``valid: [N, T]`` (False on
    the padding of packed sequences, which must leave the state as it is: unlike the
    delta family's, a zero input still writes here)."""

    xp: ModuleType
    q: Any
    k: Any
    v: Any
    beta: Any
    R_q: Any
    R_k: Any
    R_v: Any
    r_beta: Any
    S: Any
    last: Any
    scale: float
    valid: Any


def prepare(call: Call) -> tuple[Problem, Any]:
    """The problem of ``call`` and ``finish(o, (S, last)) -> (o, final_state)``."""
    xp, dt, dev = call.xp, call.dtype, call.device
    names = ("q", "k", "v", "beta", "R_q", "R_k", "R_v", "r_beta")
    q, k, v, beta, R_q, R_k, R_v, r_beta = (
        xp.astype(x, dt) for x in (call.q, call.k, call.v, *(call.inputs[n] for n in names[3:]))
    )
    t_max, valid = call.T, None
    if call.cu_seqlens is not None:
        idx, t_max = _pad_index(call.cu_seqlens, call.T, 1)
        q, k, v, beta = (_pad(xp, x, idx, dev) for x in (q, k, v, beta))
        valid = xp.asarray(idx < call.T, device=dev)
    q, k, v = (_heads_first(xp, x) for x in (q, k, v))
    beta = xp.permute_dims(beta, (0, 2, 1))
    if call.initial_state is None:
        S = xp.zeros((call.N, call.H, call.K, call.V), dtype=dt, device=dev)
        last = xp.zeros((call.N, call.H, call.V), dtype=dt, device=dev)
    else:
        S, last = (xp.astype(x, dt) for x in call.initial_state)

    def finish(o: Any, final: Any) -> tuple[Any, Any]:
        o = tokens_first(xp, o, call.cu_seqlens, t_max, dev)
        return xp.astype(o, call.v.dtype), (tuple(final) if call.output_final_state else None)

    problem = Problem(xp, q, k, v, beta, R_q, R_k, R_v, r_beta, S, last, call.scale, valid)
    return problem, finish


def _times(xp: ModuleType, R: Any, h: Any) -> Any:
    """``R h`` per head: ``[H, X, V] x [N, H, V] -> [N, H, X]``."""
    return xp.matmul(R, h[..., None])[..., 0]


def recurrent(p: Problem) -> tuple[Any, tuple[Any, Any]]:
    """``(o [N, H, T, V], (S, last))`` over every step."""
    xp, S, last = p.xp, p.S, p.last
    outputs = []
    for t in range(p.q.shape[2]):
        h = xp.tanh(last)
        qh = softmax(xp, p.q[:, :, t, :] + _times(xp, p.R_q, h))
        kh = softmax(xp, p.k[:, :, t, :] + _times(xp, p.R_k, h))
        vh = p.v[:, :, t, :] + _times(xp, p.R_v, h)
        b = sigmoid(xp, p.beta[:, :, t] + xp.sum(p.r_beta * h, axis=-1))
        error = vh - xp.matmul(kh[..., None, :], S)[..., 0, :]
        new_S = S + kh[..., :, None] * (b[..., None] * error)[..., None, :]
        o = p.scale * xp.matmul(qh[..., None, :], new_S)[..., 0, :]
        if p.valid is None:
            S, last = new_S, o
        else:
            keep = p.valid[:, t, None, None]
            S, last = xp.where(keep[..., None], new_S, S), xp.where(keep, o, last)
        outputs.append(o[:, :, None, :])
    if not outputs:
        N, H, _, V = p.v.shape
        return xp.zeros((N, H, 0, V), dtype=S.dtype, device=device(S)), (S, last)
    return xp.concat(outputs, axis=2), (S, last)
