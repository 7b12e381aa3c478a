"""A validated ``dplr`` call as the head-major arrays its forms work on, and back."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

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
    """The DPLR rule's inputs, head-major, in the compute dtype.

    ``q, k, a, b: [N, HV, R, K]`` (``q`` normalised and scaled, grouped heads expanded),
    ``v: [N, HV, R, V]``, ``log_decay: [N, HV, R, K]`` or None (no decay: ``iplr``),
    ``state: [N, HV, K, V]``. Packed sequences are a zero-padded batch: a padded step has
    ``k = v = a = b = 0`` and log-decay 0, so it leaves the state unchanged.
    """

    xp: ModuleType
    q: Any
    k: Any
    v: Any
    a: Any
    b: Any
    log_decay: Any
    state: Any


def prepare(call: Call) -> tuple[Problem, Any]:
    """The problem of ``call`` and ``finish(o, state) -> (o, final_state)`` in the caller's
    layout (``o: [N, HV, R, V]`` with ``R`` the padded token count)."""
    xp, dt, dev = call.xp, call.dtype, call.device
    G = call.HV // call.H

    def cast(x: Any) -> Any:
        return None if x is None else xp.astype(x, dt)

    q, k, v, a, b, gk = (cast(x) for x in (call.q, call.k, call.v, call.a, call.b, call.gk))
    if call.use_qk_l2norm:
        q, k = l2norm(xp, q), l2norm(xp, k)
    q = q * call.scale
    t_max = call.T
    if call.cu_seqlens is not None:
        idx, t_max = _pad_index(call.cu_seqlens, call.T, 1)
        q, k, v, a, b = (_pad(xp, x, idx, dev) for x in (q, k, v, a, b))
        gk = None if gk is None else _pad(xp, gk, idx, dev)
    if G > 1:
        q, k = xp.repeat(q, G, axis=2), xp.repeat(k, G, axis=2)
    q, k, v, a, b = (_heads_first(xp, x) for x in (q, k, v, a, b))
    gk = None if gk is None else _heads_first(xp, gk)
    if call.initial_state is None:
        state = xp.zeros((call.N, call.HV, call.K, call.V), dtype=dt, device=dev)
    else:
        state = xp.astype(call.initial_state, dt)

    def finish(o: Any, final: Any) -> tuple[Any, Any]:
        o = tokens_first(xp, o, call.cu_seqlens, t_max, dev)
        o = xp.astype(o, call.v.dtype)
        return o, (final if call.output_final_state else None)

    return Problem(xp, q, k, v, a, b, gk, state), finish


def cotangents(call: Call, p: Problem, do: Any, dstate: Any) -> tuple[Any, Any]:
    """``(do, dstate)`` of the caller's layout as head-major problem cotangents."""
    xp, dt = call.xp, call.dtype
    do_p = cotangent_rows(xp, xp.astype(do, dt), call.cu_seqlens, call.T, 1, call.device)
    ds_p = xp.zeros_like(p.state) if dstate is None else xp.astype(dstate, dt)
    return do_p, ds_p


def raw_grads(call: Call, g: dict[str, Any]) -> dict[str, Any]:
    """The gradients of the call's raw arguments from those of its :class:`Problem` ``g``
    (the adjoint of :func:`prepare`)."""
    xp, dev = call.xp, call.device
    idx = None if call.cu_seqlens is None else _pad_index(call.cu_seqlens, call.T, 1)[0]

    def back(x: Any) -> Any:
        x = heads_last(xp, x)
        return x if idx is None else unpad(xp, x, idx, call.T, dev)

    dq, dk = qk_grads(xp, call, back(g["q"]), back(g["k"]), None)
    out = {"q": dq, "k": dk, "v": back(g["v"]), "a": back(g["a"]), "b": back(g["b"])}
    if call.gk is not None:
        out["gk"] = back(g["log_decay"])
    if call.initial_state is not None:
        out["initial_state"] = g["state"]
    return out
