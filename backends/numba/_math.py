"""Vectorisable ``exp`` for the per-key-row decays: LLVM does not vectorise ``math.exp``.

Both versions reduce ``x = m ln2 + r`` with ``|r| <= ln2 / 2`` (Cody-Waite), evaluate a
Taylor polynomial of ``exp(r)`` and build ``2^m`` in the exponent bits through an integer
view of the output, so every loop compiles to 512-bit vector code where ``math.exp`` is one
libm call per element. Inputs are log-decays: ``<= 0``, ``-inf`` (gives 0) or NaN (gives NaN);
below ``UNDERFLOW`` the result is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._jit import jit, prefer_512

LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
UNDERFLOW = -708.0
UNDERFLOW32 = -87.0

Array = Any


@jit(inline=True)
def _reduce_f64(g: float) -> tuple[int, float]:
    """``g = m ln2 + r``: the exponent bits of ``2^m`` and ``r``, ``|r| <= ln2 / 2``."""
    m = np.floor(g * LOG2E + 0.5)
    m = m if m > -1022.0 else -1022.0
    return (np.int64(m) + 1023) << 52, (g - m * LN2_HI) - m * LN2_LO


@jit(inline=True)
def _poly_f64(r: float) -> float:
    """``exp(r)`` for ``|r| <= ln2 / 2`` (Taylor, degree 12)."""
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
    return p * r + 1.0


@jit(inline=True)
def _reduce_f32(g: float) -> tuple[int, float]:
    """As :func:`_reduce_f64`, in float32."""
    m = np.floor(g * np.float32(LOG2E) + np.float32(0.5))
    m = m if m > np.float32(-126.0) else np.float32(-126.0)
    bits = (np.int32(m) + np.int32(127)) << np.int32(23)
    return bits, (g - m * np.float32(0.693359375)) - m * np.float32(-2.12194440e-4)


@jit(inline=True)
def _poly_f32(r: float) -> float:
    """``exp(r)`` for ``|r| <= ln2 / 2`` in float32 (Taylor, degree 7)."""
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    return p * r + np.float32(1.0)


@jit(nrt=False)
def exp_f64(src: Array, out: Array, bits: Array, red: Array) -> None:
    """``out = exp(src)`` in float64 (error < 2e-16 relative).

    ``bits`` is ``out.view(np.int64)``, ``red`` a float64 scratch of ``out``'s size.
    """
    prefer_512()
    n = out.shape[0]
    for x in range(n):
        bits[x], red[x] = _reduce_f64(np.float64(src[x]))
    for x in range(n):
        p = _poly_f64(red[x])
        out[x] = 0.0 if np.float64(src[x]) < UNDERFLOW else p * out[x]


@jit(nrt=False)
def exp_f32(src: Array, out: Array, bits: Array, red: Array) -> None:
    """``out = exp(src)`` in float32 (error about 1 ulp).

    ``bits`` is ``out.view(np.int32)``, ``red`` a float32 scratch of ``out``'s size.
    """
    prefer_512()
    n = out.shape[0]
    for x in range(n):
        bits[x], red[x] = _reduce_f32(src[x])
    for x in range(n):
        p = _poly_f32(red[x])
        out[x] = np.float32(0.0) if src[x] < np.float32(UNDERFLOW32) else p * out[x]


@jit(nrt=False)
def decay_rows_f64(src: Array, c: Array, scratch: Array, red: Array, tiny: float) -> int:
    """``c *= exp(src)`` over ``c``'s length (float64); returns how many ``c`` fell below
    ``tiny``. ``src`` may be a :func:`row` pointer; ``scratch`` and ``red`` are float64 arrays
    of ``c``'s size. The running decay of the per-key-row gates, fused with its ``exp``."""
    prefer_512()
    n = c.shape[0]
    bits = scratch.view(np.int64)
    for x in range(n):
        bits[x], red[x] = _reduce_f64(np.float64(src[x]))
    count = 0
    for x in range(n):
        a = 0.0 if np.float64(src[x]) < UNDERFLOW else _poly_f64(red[x]) * scratch[x]
        cx = c[x] * a
        c[x] = cx
        count += cx < tiny
    return count


@jit(nrt=False)
def decay_rows_f32(src: Array, c: Array, scratch: Array, red: Array, tiny: float) -> int:
    """As :func:`decay_rows_f64`, in float32."""
    prefer_512()
    n = c.shape[0]
    bits = scratch.view(np.int32)
    for x in range(n):
        bits[x], red[x] = _reduce_f32(src[x])
    count = 0
    for x in range(n):
        a = np.float32(0.0) if src[x] < np.float32(UNDERFLOW32) else _poly_f32(red[x]) * scratch[x]
        cx = c[x] * a
        c[x] = cx
        count += cx < tiny
    return count


@jit(nrt=False)
def decay_rows_reset_f64(src: Array, c: Array, scratch: Array, red: Array, tiny: float) -> int:
    """:func:`decay_rows_f64` where a decay of 0 (``-inf`` or an underflow) sets ``c`` to exactly
    0, even from NaN or Inf: a hard reset of that key row."""
    prefer_512()
    n = c.shape[0]
    bits = scratch.view(np.int64)
    for x in range(n):
        bits[x], red[x] = _reduce_f64(np.float64(src[x]))
    count = 0
    for x in range(n):
        # exp(src) is 0 exactly below UNDERFLOW and nonzero above it, so the reset is one
        # select on src. Every load is unconditional: a load inside a branch of the select
        # (c[x] only where exp != 0) kept LLVM from vectorising the loop (3-4x slower).
        cv = c[x]
        p = cv * (_poly_f64(red[x]) * scratch[x])
        cx = 0.0 if np.float64(src[x]) < UNDERFLOW else p
        c[x] = cx
        count += cx < tiny
    return count


@jit(nrt=False)
def decay_rows_reset_f32(src: Array, c: Array, scratch: Array, red: Array, tiny: float) -> int:
    """As :func:`decay_rows_reset_f64`, in float32."""
    prefer_512()
    n = c.shape[0]
    bits = scratch.view(np.int32)
    for x in range(n):
        bits[x], red[x] = _reduce_f32(src[x])
    count = 0
    for x in range(n):
        cv = c[x]  # unconditional loads, as in decay_rows_reset_f64
        p = cv * (_poly_f32(red[x]) * scratch[x])
        cx = np.float32(0.0) if src[x] < np.float32(UNDERFLOW32) else p
        c[x] = cx
        count += cx < tiny
    return count


@jit(inline=True)
def reduce_rows_f32(src: Array, bits: Array, red: Array, i: int) -> None:
    """``bits[i], red[i]``: the range reduction of :func:`exp_f32` of ``src[:n]`` (``bits`` an
    int32 view of a float32 scratch, whose elements are then ``2^m``; ``n = red.shape[1]``).
    Rows are indexed by ``i`` and elements by the loop variable: an index with an offset
    compiles to gathers."""
    for x in range(red.shape[1]):
        bits[i, x], red[i, x] = _reduce_f32(src[x])


@jit(inline=True)
def reduce_rows_f64(src: Array, bits: Array, red: Array, i: int) -> None:
    """As :func:`reduce_rows_f32`, in float64."""
    for x in range(red.shape[1]):
        bits[i, x], red[i, x] = _reduce_f64(np.float64(src[x]))


@jit(inline=True)
def decayed_f32(cv: float, g: float, r: float, e: float) -> float:
    """``cv * exp(g)`` from the reduction ``(r, e = 2^m)`` of ``g``, exactly 0 where ``g`` is
    below the underflow (as :func:`decay_rows_reset_f32`, bit for bit)."""
    p = cv * (_poly_f32(r) * e)
    return np.float32(0.0) if g < np.float32(UNDERFLOW32) else p


@jit(inline=True)
def decayed_f64(cv: float, g: float, r: float, e: float) -> float:
    """As :func:`decayed_f32`, in float64 (as :func:`decay_rows_reset_f64`)."""
    p = cv * (_poly_f64(r) * e)
    return 0.0 if np.float64(g) < UNDERFLOW else p
