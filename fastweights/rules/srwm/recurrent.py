"""The self-referential weight matrix step by step, on head-major arrays (the definition every
kernel is checked against)."""

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
    """``x: [N, H, T, D]``, the weights ``W: [N, H, D, V + 2D + 4]``, ``V``, and ``valid:
    [N, T]`` (False on the padding of packed sequences, which leaves ``W`` as it is)."""

    xp: ModuleType
    x: Any
    W: Any
    V: int
    valid: Any


def prepare(call: Call) -> tuple[Problem, Any]:
    """The problem of ``call`` and ``finish(o, W) -> (o, final_state)``."""
    xp, dt, dev = call.xp, call.dtype, call.device
    x = xp.astype(call.x, dt)
    t_max, valid = call.T, None
    if call.cu_seqlens is not None:
        idx, t_max = _pad_index(call.cu_seqlens, call.T, 1)
        x = _pad(xp, x, idx, dev)
        valid = xp.asarray(idx < call.T, device=dev)
    x = _heads_first(xp, x)
    if call.initial_state is None:
        W0 = xp.astype(call.W0, dt)
        W = xp.broadcast_to(W0[None, ...], (call.N, *W0.shape))
    else:
        W = xp.astype(call.initial_state, dt)

    def finish(o: Any, final: Any) -> tuple[Any, Any]:
        o = tokens_first(xp, o, call.cu_seqlens, t_max, dev)
        final = xp.asarray(final, copy=True) if call.output_final_state else None
        return xp.astype(o, call.x.dtype), final

    return Problem(xp, x, W, call.V, valid), finish


def _read(xp: ModuleType, W: Any, p: Any) -> Any:
    """``W^T p`` per head: ``[N, H, D, M] x [N, H, D] -> [N, H, M]``."""
    return xp.matmul(p[..., None, :], W)[..., 0, :]


def recurrent(p: Problem) -> tuple[Any, Any]:
    """``(o [N, H, T, V], W)`` over every step."""
    xp, W, V = p.xp, p.W, p.V
    D = p.x.shape[-1]
    outputs = []
    for t in range(p.x.shape[2]):
        out = _read(xp, W, softmax(xp, p.x[:, :, t, :]))
        y, key, query = out[..., :V], out[..., V : V + D], out[..., V + D : V + 2 * D]
        rates = sigmoid(xp, out[..., V + 2 * D :])  # [N, H, 4]: one per block of columns
        pk = softmax(xp, key)
        change = _read(xp, W, softmax(xp, query)) - _read(xp, W, pk)
        lr = xp.concat(
            [
                xp.broadcast_to(rates[..., i : i + 1], (*rates.shape[:-1], width))
                for i, width in enumerate((V, D, D, 4))
            ],
            axis=-1,
        )
        new_W = W + pk[..., :, None] * (lr * change)[..., None, :]
        W = new_W if p.valid is None else xp.where(p.valid[:, t, None, None, None], new_W, W)
        outputs.append(y[:, :, None, :])
    if not outputs:
        N, H = W.shape[:2]
        return xp.zeros((N, H, 0, V), dtype=W.dtype, device=device(W)), W
    return xp.concat(outputs, axis=2), W
