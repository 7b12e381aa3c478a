"""Numerical constants of the rules, defined once for Python, numba and CUDA.

The CUDA kernels receive them as preprocessor definitions when they are compiled
(:func:`cuda_defines`), so no source repeats them.
"""

from __future__ import annotations

L2NORM_EPS = 1e-6
"""``use_qk_l2norm``: ``x / sqrt(|x|^2 + L2NORM_EPS)`` (fla's ``l2norm``)."""

NORMALIZE_EPS = 1e-10
"""``linear_attn(normalize=True)``: ``o / (q . z + NORMALIZE_EPS)``."""

SUB_BLOCK = 16
"""Rows per block of the per-key-channel decay scores and of the triangular solves of the
chunk forms: each block measures its decays from its own first row, so no factor overflows
while the decay over one block stays above ``exp(-88 / 16)`` per step in float32."""


def cuda_macros() -> tuple[tuple[str, str], ...]:
    """The constants as ``(name, value)`` preprocessor definitions of the CUDA sources."""
    return (("FW_L2NORM_EPS", repr(L2NORM_EPS)), ("FW_NORMALIZE_EPS", repr(NORMALIZE_EPS)))


def cuda_defines() -> tuple[str, ...]:
    """The constants as NVRTC options, e.g. ``-DFW_L2NORM_EPS=1e-06``."""
    return tuple(f"-D{name}={value}" for name, value in cuda_macros())
