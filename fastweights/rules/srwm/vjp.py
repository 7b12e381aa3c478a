"""The self-referential weight matrix's gradient: the reverse sweep of
:func:`.recurrent.recurrent`.

One step, per (sequence, head), from ``W = W_{t-1}`` (``phi = softmax``, ``M = V + 2D + 4``)::

    px = phi(x_t);   [y, key, query, z] = W^T px   (split V, D, D, 4);   o_t = y
    pk = phi(key);   pq = phi(query);   c = W^T (pq - pk);   lr = sigmoid(z) per block
    W_t = W + pk (lr * c)^T

and its adjoint, from ``Wbar`` (the cotangent of ``W_t``; at the last step that of the final
state)::

    pkbar = Wbar (lr c);   ubar = Wbar^T pk;   lrbar = ubar * c;   cbar = ubar * lr
    Wbar_{t-1} = Wbar + (pq - pk) cbar^T + px outbar^T
    pqbar = W cbar;   pkbar -= W cbar
    outbar = [do_t, phi'(pk) pkbar, phi'(pq) pqbar, (block sums of lrbar) lr (1 - lr)]
    (x_t)bar = phi'(px) W outbar,    phi'(s) sbar = s * (sbar - s . sbar)

``W0`` (shared by every sequence) receives the sum over sequences of ``Wbar_0``; with an
``initial_state`` that replaces it, the state receives ``Wbar_0`` and ``W0`` gradient 0.
Memory: ``W`` every ``call.chunk_size`` steps (64: the op takes no ``chunk_size``) from one
forward pass, each chunk's steps recomputed from its boundary in the reverse sweep; never a
weight per token for the whole sequence. The padding of packed sequences leaves ``W`` as it
is: there the cotangent passes through unchanged.
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import TYPE_CHECKING, Any

from array_api_compat import device

from .._activations import sigmoid, softmax
from .._layout import cotangent_rows, tokens_first
from .recurrent import Problem, _read, prepare

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..._validate import Call


def _softmax_vjp(xp: ModuleType, s: Any, ds: Any) -> Any:
    return s * (ds - xp.sum(s * ds, axis=-1, keepdims=True))


def _widths(p: Problem) -> tuple[int, int, int, int]:
    D = p.x.shape[-1]
    return (p.V, D, D, 4)


def _expand(xp: ModuleType, rates: Any, widths: tuple[int, ...]) -> Any:
    """``[..., 4]`` -> ``[..., M]``: each rate repeated over its block of columns."""
    parts = [
        xp.broadcast_to(rates[..., i : i + 1], (*rates.shape[:-1], w)) for i, w in enumerate(widths)
    ]
    return xp.concat(parts, axis=-1)


def _forward(p: Problem, W: Any, t: int) -> tuple[Any, ...]:
    """Step ``t`` from ``W_{t-1}``, with what its adjoint reads (the forward's arithmetic)."""
    xp, V = p.xp, p.V
    D = p.x.shape[-1]
    px = softmax(xp, p.x[:, :, t, :])
    out = _read(xp, W, px)
    pk = softmax(xp, out[..., V : V + D])
    pq = softmax(xp, out[..., V + D : V + 2 * D])
    rates = sigmoid(xp, out[..., V + 2 * D :])
    change = _read(xp, W, pq) - _read(xp, W, pk)
    new_W = W + pk[..., :, None] * (_expand(xp, rates, _widths(p)) * change)[..., None, :]
    if p.valid is not None:
        new_W = xp.where(p.valid[:, t, None, None, None], new_W, W)
    return px, pk, pq, rates, change, new_W


def recurrent_vjp(p: Problem, do: Any, dstate: Any, chunk_size: int) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final * dstate)`` for :func:`.recurrent.recurrent`.

    ``do: [N, H, T, V]`` head-major, ``dstate: [N, H, D, M]`` (zeros for none). Returns
    ``{"x": [N, H, T, D], "W": [N, H, D, M]}`` (``W``: the cotangent of the initial weight).
    """
    xp, T = p.xp, p.x.shape[2]
    widths = _widths(p)
    zero = xp.zeros((), dtype=p.W.dtype, device=device(p.W))
    C = max(1, min(chunk_size, T))
    boundaries = [p.W]
    W = p.W
    for t in range(T):
        W = _forward(p, W, t)[-1]
        if (t + 1) % C == 0 and t + 1 < T:
            boundaries.append(W)
    dW = dstate
    rows = []
    for c in range((T - 1) // C, -1, -1):
        start, stop = c * C, min(T, (c + 1) * C)
        before = []
        W = boundaries[c]
        for t in range(start, stop):
            before.append(W)
            W = _forward(p, W, t)[-1]
        for t in range(stop - 1, start - 1, -1):
            W = before[t - start]
            px, pk, pq, rates, change, _ = _forward(p, W, t)
            dWn, do_t = dW, do[:, :, t, :]
            if p.valid is not None:  # padding: the step is the identity
                keep = p.valid[:, t, None, None]
                dWn, do_t = xp.where(keep[..., None], dW, zero), xp.where(keep, do_t, zero)
            lr = _expand(xp, rates, widths)
            dpk = xp.matmul(dWn, (lr * change)[..., None])[..., 0]
            du = xp.matmul(pk[..., None, :], dWn)[..., 0, :]
            dlr, dchange = du * change, du * lr
            Wc = xp.matmul(W, dchange[..., None])[..., 0]
            dpk = dpk - Wc
            edges = itertools.pairwise(itertools.accumulate(widths, initial=0))
            drates = xp.stack([xp.sum(dlr[..., a:b], axis=-1) for a, b in edges], axis=-1)
            dout = xp.concat(
                [
                    do_t,
                    _softmax_vjp(xp, pk, dpk),
                    _softmax_vjp(xp, pq, Wc),
                    drates * rates * (1 - rates),
                ],
                axis=-1,
            )
            dx = _softmax_vjp(xp, px, xp.matmul(W, dout[..., None])[..., 0])
            dW_prev = (
                dWn
                + (pq - pk)[..., :, None] * dchange[..., None, :]
                + px[..., :, None] * dout[..., None, :]
            )
            if p.valid is not None:
                dW_prev = xp.where(p.valid[:, t, None, None, None], dW_prev, dW)
            dW = dW_prev
            rows.append(dx)
    dx_all = xp.stack(rows[::-1], axis=2) if rows else xp.zeros_like(p.x)
    return {"x": dx_all, "W": dW}


def vjp(
    call: Call,
    form: str,
    do: Any,
    dstate: Any,
    *,
    sweeps: Mapping[str, Callable[..., dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Gradients of ``L = sum(o * do) + sum(final * dstate)`` with respect to the raw
    arguments of an ``srwm`` call: ``x``, ``W0`` and ``initial_state`` when the call has one
    (then ``W0``'s gradient is 0: the state replaces it), in the compute dtype. ``do`` is like
    ``o``, ``dstate`` like the final state or None. The recurrent sweep (:func:`recurrent_vjp`,
    the only form) unless ``sweeps`` has one for ``form``.
    """
    xp, dt, dev = call.xp, call.dtype, call.device
    problem, _ = prepare(call)
    do = cotangent_rows(xp, xp.astype(do, dt), call.cu_seqlens, call.T, 1, dev)
    t_max = do.shape[2]
    if dstate is None:
        dstate = xp.zeros(problem.W.shape, dtype=dt, device=dev)
    else:
        dstate = xp.astype(dstate, dt)
    sweep = (sweeps or {}).get(form, recurrent_vjp)
    d = sweep(problem, do, dstate, call.chunk_size)
    grads = {"x": tokens_first(xp, d["x"], call.cu_seqlens, t_max, dev)}
    if call.initial_state is None:
        grads["W0"] = xp.sum(d["W"], axis=0)
    else:
        grads["W0"] = xp.zeros(call.W0.shape, dtype=dt, device=dev)
        grads["initial_state"] = d["W"]
    return grads
