"""Compiling and launching the CUDA kernels: ``cupy.RawModule`` or the CPU emulator.

The kernel source (``kernels/*.cu``, package data) is compiled lazily, one module per
``(device, source, options, group of template instantiations)``; the instantiations are named
with ``name_expressions``. CuPy also keeps the compiled binaries in its on-disk kernel cache,
the emulator in ``CUDASIM_CACHE_DIR``. Scalars are passed as NumPy scalars of exactly the C++
parameter types (CuPy would otherwise pass a Python int as ``long long`` and a float as
``double``, reinterpreted on the GPU).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from fastweights.backends import cuda_defines

from . import MAX_K

OPTIONS = ("-std=c++17", *cuda_defines())
"""NVRTC options of every module (the emulator ignores those without a CPU meaning); the
rules' constants come from :func:`fastweights.backends.cuda_defines` as ``-D`` definitions."""

_SOURCES = ("common.cuh", "recurrent.cu")

GATE_HEAD, GATE_KEY, BETA_HEAD, BETA_VALUE, NORMALIZE = 1, 2, 4, 8, 16
"""Bits of the compile-time ``MODE`` of ``fw_recurrent`` (see ``kernels/recurrent.cu``)."""

MODES = (
    *(g | b for g in (0, GATE_HEAD, GATE_KEY) for b in (0, BETA_HEAD, BETA_VALUE)),
    NORMALIZE,
)
"""Every ``MODE`` an op uses: all gate x beta combinations, and the normaliser alone."""

HAS_H0, HAS_HT, HAS_CU, HAS_IDX, L2NORM, HAS_Z0, HAS_ZT = 1, 2, 4, 8, 16, 32, 64
"""Bits of the run-time ``flags`` argument of ``fw_recurrent``."""


_CTYPES = {"float16": "fw_half", "float32": "float", "float64": "double"}

INT32_MAX = 2**31 - 1


def int32(name: str, value: int) -> np.int32:
    """``value`` as the kernels' ``int`` parameter; ``ValueError`` naming it if it does not fit
    (NumPy would raise ``OverflowError``, or wrap around on older versions)."""
    if not 0 <= value <= INT32_MAX:
        raise ValueError(f"{name} = {value} is outside the CUDA kernels' range 0..{INT32_MAX}")
    return np.int32(value)


@cache
def source() -> str:
    """The CUDA C++ source of every kernel, as handed to NVRTC and to the emulator."""
    root = resources.files("fastweights.backends.cupy").joinpath("kernels")
    return "\n".join(root.joinpath(name).read_text() for name in _SOURCES)


@dataclass(frozen=True)
class Tile:
    """How one (sequence, value head, V tile) maps onto a thread block.

    ``KPT`` state rows per thread, ``KSPLIT`` threads (consecutive lanes) per value column,
    ``BV`` value columns per block: ``KPT * KSPLIT >= K`` and the block has ``BV * KSPLIT``
    threads, a multiple of 32.
    """

    kpt: int
    ksplit: int
    bv: int

    @property
    def threads(self) -> int:
        return self.bv * self.ksplit

    @property
    def rows(self) -> int:
        return self.kpt * self.ksplit


def tile_for(K: int, compute: str) -> Tile:
    """The tile of a head with key dimension ``K`` (1..256) and compute dtype ``compute``.

    At most 16 float (8 double) state entries per thread, 256 threads per block at most, and
    the staging tile of ``rows x (BV + 1)`` entries well under 48 KiB of shared memory.
    """
    if not 1 <= K <= MAX_K:
        raise ValueError(f"K = {K} is outside the kernels' range 1..{MAX_K}")
    rows = max(8, 1 << (K - 1).bit_length())
    kpt = 16 if rows >= 128 and compute != "float64" else 8
    ksplit = rows // kpt
    return Tile(kpt, ksplit, max(8, min(32, 256 // ksplit)))


def ctype(dtype: Any) -> str:
    """The C++ type of a NumPy/CuPy float dtype in the kernels."""
    return _CTYPES[np.dtype(dtype).name]


def name_expression(tin: str, tc: str, tile: Tile, mode: int) -> str:
    """``fw_recurrent<Tin, Tc, KPT, KSPLIT, BV, MODE>`` for ``name_expressions``."""
    return f"fw_recurrent<{tin}, {tc}, {tile.kpt}, {tile.ksplit}, {tile.bv}, {mode}>"


def group(tin: str, tc: str, tile: Tile) -> tuple[str, ...]:
    """The instantiations compiled together: every ``MODE`` of one dtype pair and tile."""
    return tuple(name_expression(tin, tc, tile, m) for m in MODES)


_lock = threading.Lock()
_modules: dict[tuple[Any, ...], Any] = {}


def _module(device: Any, names: tuple[str, ...]) -> Any:
    key = (device, source(), OPTIONS, names)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            if device == "emulator":
                from .emulator import RawModule

                mod = RawModule(source(), OPTIONS, name_expressions=names)
            else:
                import cupy

                mod = cupy.RawModule(code=source(), options=OPTIONS, name_expressions=names)
            _modules[key] = mod
        return mod


def kernel(device: Any, name: str, names: tuple[str, ...]) -> Any:
    """The kernel ``name`` (one of ``names``) for ``device`` (a CuPy device id or
    ``"emulator"``), compiling the module of ``names`` on first use."""
    return _module(device, names).get_function(name)


def launch(
    device: Any,
    name: str,
    names: tuple[str, ...],
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: tuple[Any, ...],
) -> None:
    """Launch kernel ``name`` on the current stream (or run it in the emulator)."""
    if min(grid) <= 0:
        return
    kernel(device, name, names)(grid, block, args)
