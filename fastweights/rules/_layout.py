"""Layout helpers every rule family's problem preparation shares.

The forms work per (sequence, value head) on a head-major layout ``[N, HV, T, D]`` in the
compute dtype, with ``q`` already normalised and scaled and grouped heads expanded. Packed
sequences become a zero-padded batch whose padded steps leave the state unchanged, so every
form stays exact without knowing about ``cu_seqlens``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import device

from .._constants import L2NORM_EPS


def l2norm(xp: ModuleType, x: Any) -> Any:
    return x / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def _pad_index(cu: np.ndarray, T: int, n: int) -> tuple[np.ndarray, int]:
    """Rows of the packed array (``n`` per token) for each padded slot; ``T*n`` is the zero row."""
    lengths = np.diff(cu)
    t_max = int(lengths.max()) if lengths.size else 0
    steps = np.arange(t_max * n)
    idx = cu[:-1, None] * n + steps[None, :]
    idx = np.where(steps[None, :] < lengths[:, None] * n, idx, T * n)
    return idx, t_max


def _unpack_index(cu: np.ndarray, t_max: int) -> np.ndarray:
    """Flat padded positions ``i * t_max + t`` of the packed tokens, in packed order."""
    seq = np.repeat(np.arange(cu.shape[0] - 1), np.diff(cu))
    return seq * t_max + (np.arange(int(cu[-1])) - cu[seq])


def _pad(xp: ModuleType, x: Any, idx: np.ndarray, device: Any) -> Any:
    """``[1, T*n, ...]`` packed rows -> ``[N, t_max*n, ...]`` padded with zero rows."""
    rows = x[0, ...]
    zero = xp.zeros((1, *rows.shape[1:]), dtype=rows.dtype, device=device)
    table = xp.concat([rows, zero], axis=0)
    flat = xp.take(table, xp.asarray(idx.reshape(-1), device=device), axis=0)
    return xp.reshape(flat, (*idx.shape, *rows.shape[1:]))


def tokens_first(xp: ModuleType, o: Any, cu_seqlens: Any, t_max: int, dev: Any) -> Any:
    """A form's head-major output ``[N, HV, T', V]`` back in the caller's layout: ``[B, T, HV,
    V]``, or ``[1, T, HV, V]`` with the padding of packed sequences (``cu_seqlens``) dropped."""
    o = xp.permute_dims(o, (0, 2, 1, 3))
    if cu_seqlens is None:
        return o
    flat = xp.reshape(o, (-1, *o.shape[2:]))
    unpack = xp.asarray(_unpack_index(cu_seqlens, t_max), device=dev)
    return xp.take(flat, unpack, axis=0)[None, ...]


def _heads_first(xp: ModuleType, x: Any) -> Any:
    """``[N, R, HV, ...]`` -> ``[N, HV, R, ...]``."""
    axes = (0, 2, 1, *range(3, x.ndim))
    return xp.permute_dims(x, axes)


def pad_to_multiple(xp: ModuleType, x: Any, axis: int, multiple: int) -> Any:
    """Append zero rows along ``axis`` up to a multiple of ``multiple``."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[axis] = extra
    zero = xp.zeros(tuple(shape), dtype=x.dtype, device=device(x))
    return xp.concat([x, zero], axis=axis)


# Adjoints of the preparation, for the gradients (fastweights.vjp): each maps the cotangent of
# a prepared array back to the argument it was made from.


def l2norm_vjp(xp: ModuleType, x: Any, dy: Any) -> Any:
    """The cotangent of ``x`` given that of ``l2norm(x)``: ``r dy - x r^3 (x . dy)`` with
    ``r = (|x|^2 + eps)^(-1/2)``."""
    r = 1.0 / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)
    return r * dy - x * (r * r * r) * xp.sum(x * dy, axis=-1, keepdims=True)


def unpad(xp: ModuleType, x: Any, idx: np.ndarray, rows: int, dev: Any) -> Any:
    """The adjoint of :func:`_pad` (which copies each packed row at most once):
    ``[N, L, ...]`` padded rows -> ``[1, rows, ...]`` packed rows."""
    flat_idx = idx.reshape(-1)
    source = np.zeros(rows, dtype=np.int64)
    valid = flat_idx < rows
    source[flat_idx[valid]] = np.nonzero(valid)[0]
    flat = xp.reshape(x, (-1, *x.shape[2:]))
    return xp.take(flat, xp.asarray(source, device=dev), axis=0)[None, ...]


def group_sum(xp: ModuleType, x: Any, G: int) -> Any:
    """The adjoint of ``repeat(x, G, axis=2)`` on ``[N, R, H*G, D]``: the sum over each group."""
    if G == 1:
        return x
    N, R, HV, D = x.shape
    return xp.sum(xp.reshape(x, (N, R, HV // G, G, D)), axis=3)


def heads_last(xp: ModuleType, x: Any) -> Any:
    """``[N, HV, R, ...]`` -> ``[N, R, HV, ...]`` (the inverse of :func:`_heads_first`)."""
    return _heads_first(xp, x)


def cotangent_rows(xp: ModuleType, do: Any, cu: Any, T: int, n: int, dev: Any) -> Any:
    """``do [B, T, HV, V]`` in the caller's layout -> head-major problem rows ``[N, HV, R, V]``:
    with ``n > 1`` (DeltaProduct) each token's cotangent sits on its last step's row."""
    if n > 1:
        B = do.shape[0]
        zeros = xp.zeros((B, T, n - 1, *do.shape[2:]), dtype=do.dtype, device=dev)
        do = xp.reshape(xp.concat([zeros, do[:, :, None, ...]], axis=2), (B, T * n, *do.shape[2:]))
    if cu is not None:
        idx, _ = _pad_index(cu, T, n)
        do = _pad(xp, do, idx, dev)
    return _heads_first(xp, do)


def qk_grads(xp: ModuleType, call: Any, dq: Any, dk: Any, q_rows: Any) -> tuple[Any, Any]:
    """The cotangents of the raw ``q, k`` from those of the prepared (scaled, normalised,
    group-expanded) rows ``[N, R, HV, K]`` already unpadded to ``[B, T*, HV, K]``; ``q_rows``
    selects the rows of ``dq`` that hold a read (DeltaProduct: each token's last step)."""
    G = call.HV // call.H
    dq, dk = group_sum(xp, dq, G), group_sum(xp, dk, G)
    if q_rows is not None:
        dq = dq[:, q_rows, ...]
    dq = dq * call.scale
    if call.use_qk_l2norm:
        dq = l2norm_vjp(xp, xp.astype(call.q, dq.dtype), dq)
        dk = l2norm_vjp(xp, xp.astype(call.k, dk.dtype), dk)
    return dq, dk
