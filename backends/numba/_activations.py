"""Vectorisable softmax and tanh for the rules whose slow net runs inside the kernel
(``recurrent_delta_rule``, ``srwm``): LLVM vectorises neither ``math.exp`` nor ``math.tanh``.

Both build on the range reduction of :mod:`._math` (``g = m ln2 + r``, ``|r| <= ln2 / 2``,
``2^m`` written through an integer view of the output):

- softmax: ``exp(y - max y)``, an argument ``<= 0``, exactly 0 below the underflow; the sum is
  then divided out. NaN anywhere gives NaN everywhere, as NumPy's.
- tanh: ``tanh |x| = -e / (2 + e)`` with ``e = exp(-2|x|) - 1`` computed as
  ``(2^m - 1) + 2^m expm1(r)`` (``2^m - 1`` is exact, and for small ``|x|`` ``m = 0``: no
  cancellation), the sign restored by a select. NaN stays NaN, ``+-inf`` gives ``+-1``.

Each function works in the dtype of its output (float32 or float64) and takes float scratch
arrays of at least ``n`` elements; none allocates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._jit import jit, prefer_512
from ._math import UNDERFLOW, UNDERFLOW32, _poly_f32, _poly_f64, _reduce_f32, _reduce_f64

Array = Any


@jit(inline=True)
def _em1_f64(r: float) -> float:
    """``exp(r) - 1`` for ``|r| <= ln2 / 2`` without cancellation (:func:`._math._poly_f64`
    without its last ``+ 1``)."""
    p = 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    return p * r


@jit(inline=True)
def _em1_f32(r: float) -> float:
    """As :func:`_em1_f64`, in float32 (:func:`._math._poly_f32` without its last ``+ 1``)."""
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    return p * r


LANES = 16
"""Independent running maxima of :func:`_max`: one 512-bit vector of float32."""


@jit(inline=True)
def _max(g: Array, n: int, M: Array) -> Any:
    """``max(g[:n])``, in vector code: LLVM vectorises a max reduction only under the no-NaN
    flag, so ``LANES`` running maxima are kept elementwise, then halved. A NaN is skipped or
    taken (the softmax that uses it is NaN either way). (A stepped ``range`` here compiled to
    slow code: blocks are counted instead.)"""
    for i in range(LANES):
        M[i] = g[0]
    blocks = n // LANES
    for c in range(blocks):
        m0 = c * LANES
        for i in range(LANES):
            y = g[m0 + i]
            M[i] = y if y > M[i] else M[i]
    for m in range(blocks * LANES, n):
        y = g[m]
        M[0] = y if y > M[0] else M[0]
    for i in range(8):
        M[i] = M[i + 8] if M[i + 8] > M[i] else M[i]
    for i in range(4):
        M[i] = M[i + 4] if M[i + 4] > M[i] else M[i]
    for i in range(2):
        M[i] = M[i + 2] if M[i + 2] > M[i] else M[i]
    return M[1] if M[1] > M[0] else M[0]


@jit(nrt=False, noalias=True, reduce=True)
def softmax_into(
    src: Any, add: Array, a0: int, n: int, out: Array, g: Array, red: Array, M: Array
) -> None:
    """``out[:n] = softmax(src[:n] + add[a0 : a0 + n])``, max-subtracted.

    ``src`` is a row (:func:`._jit.row`) or an array; ``add`` an array of the output's dtype
    (``a0`` pointing at zeros to add nothing); ``g``, ``red`` scratch of the output's dtype,
    ``M`` of :data:`LANES` elements.

    NaN propagates without a test: a NaN entry, which the max skips, gives a NaN exponential,
    hence a NaN sum and NaN everywhere, as NumPy's softmax; ``+inf`` does through
    ``inf - inf``.
    """
    prefer_512()
    if n == 0:
        return
    for m in range(n):
        g[m] = src[m] + add[a0 + m]
    mx = _max(g, n, M)
    if out.itemsize == 4:
        _exp_normalise_f32(g, mx, n, out, red)
    else:
        _exp_normalise_f64(g, mx, n, out, red)


@jit(inline=True)
def _exp_normalise_f32(g: Array, mx: Any, n: int, out: Array, red: Array) -> None:
    """``out[:n] = exp(g - mx) / sum(exp(g - mx))`` in float32 (``g <= mx``; ``g`` is left
    holding ``g - mx``); a function of its own so that its variables stay float32 (numba
    unifies a variable's types across branches)."""
    bits32 = out.view(np.int32)
    for m in range(n):
        y = g[m] - mx
        g[m] = y
        bits32[m], red[m] = _reduce_f32(y)
    s = np.float32(0.0)
    for m in range(n):
        e = _poly_f32(red[m]) * out[m]
        e = np.float32(0.0) if g[m] < np.float32(UNDERFLOW32) else e
        out[m] = e
        s += e
    inv = np.float32(1.0) / s
    for m in range(n):
        out[m] = out[m] * inv


@jit(inline=True)
def _exp_normalise_f64(g: Array, mx: Any, n: int, out: Array, red: Array) -> None:
    """As :func:`_exp_normalise_f32`, in float64."""
    bits64 = out.view(np.int64)
    for m in range(n):
        y = g[m] - mx
        g[m] = y
        bits64[m], red[m] = _reduce_f64(np.float64(y))
    s = 0.0
    for m in range(n):
        e = _poly_f64(red[m]) * out[m]
        e = 0.0 if g[m] < UNDERFLOW else e
        out[m] = e
        s += e
    inv = 1.0 / s
    for m in range(n):
        out[m] = out[m] * inv


@jit(nrt=False, noalias=True)
def tanh_into(src: Array, n: int, out: Array, g: Array, red: Array) -> None:
    """``out[:n] = tanh(src[:n])`` (``src`` an array of the output's dtype, not ``out``)."""
    prefer_512()
    if out.itemsize == 4:
        _tanh_f32(src, n, out, g, red)
    else:
        _tanh_f64(src, n, out, g, red)


@jit(inline=True)
def _tanh_f32(src: Array, n: int, out: Array, g: Array, red: Array) -> None:
    bits32 = out.view(np.int32)
    for x in range(n):
        a = abs(src[x])
        gx = -(a + a)
        g[x] = gx
        bits32[x], red[x] = _reduce_f32(gx)
    for x in range(n):
        e2m = out[x]
        e = (e2m - np.float32(1.0)) + e2m * _em1_f32(red[x])
        e = np.float32(-1.0) if g[x] < np.float32(UNDERFLOW32) else e
        t = -e / (np.float32(2.0) + e)
        out[x] = t if src[x] >= np.float32(0.0) else -t


@jit(inline=True)
def _tanh_f64(src: Array, n: int, out: Array, g: Array, red: Array) -> None:
    bits64 = out.view(np.int64)
    for x in range(n):
        a = abs(src[x])
        gx = -(a + a)
        g[x] = gx
        bits64[x], red[x] = _reduce_f64(np.float64(gx))
    for x in range(n):
        e2m = out[x]
        e = (e2m - 1.0) + e2m * _em1_f64(red[x])
        e = -1.0 if g[x] < UNDERFLOW else e
        t = -e / (2.0 + e)
        out[x] = t if src[x] >= 0.0 else -t


@jit(nrt=False)
def sigmoid(x: float) -> float:
    """``1 / (1 + exp(-x))`` in float64, without overflow (one per token: a libm call)."""
    y = np.float64(x)
    if y >= 0.0:
        return 1.0 / (1.0 + np.exp(-y))
    e = np.exp(y)
    return e / (1.0 + e)
