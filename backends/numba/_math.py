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


@jit(nrt=False)
def exp_f64(src: Array, out: Array, bits: Array, red: Array) -> None:
    """``out = exp(src)`` in float64 (error < 2e-16 relative).

    ``bits`` is ``out.view(np.int64)``, ``red`` a float64 scratch of ``out``'s size.
    """
    prefer_512()
    n = out.shape[0]
    for x in range(n):
        g = np.float64(src[x])
        m = np.floor(g * LOG2E + 0.5)
        m = m if m > -1022.0 else -1022.0
        bits[x] = (np.int64(m) + 1023) << 52
        red[x] = (g - m * LN2_HI) - m * LN2_LO
    for x in range(n):
        r = red[x]
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
        p = p * r + 1.0
        out[x] = 0.0 if np.float64(src[x]) < UNDERFLOW else p * out[x]


@jit(nrt=False)
def exp_f32(src: Array, out: Array, bits: Array, red: Array) -> None:
    """``out = exp(src)`` in float32 (error about 1 ulp).

    ``bits`` is ``out.view(np.int32)``, ``red`` a float32 scratch of ``out``'s size.
    """
    prefer_512()
    n = out.shape[0]
    for x in range(n):
        g = src[x]
        m = np.floor(g * np.float32(LOG2E) + np.float32(0.5))
        m = m if m > np.float32(-126.0) else np.float32(-126.0)
        bits[x] = (np.int32(m) + np.int32(127)) << np.int32(23)
        red[x] = (g - m * np.float32(0.693359375)) - m * np.float32(-2.12194440e-4)
    for x in range(n):
        r = red[x]
        p = np.float32(1.0 / 5040.0)
        p = p * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        out[x] = np.float32(0.0) if src[x] < np.float32(UNDERFLOW32) else p * out[x]
