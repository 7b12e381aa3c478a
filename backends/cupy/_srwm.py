"""From a validated ``srwm`` call to one launch of ``fw_srwm`` (``kernels/srwm.cu``), and back;
decoding steps into a state pool.

Each token reads every column of the previous weight, so a block owns a whole (sequence,
head): the ``D x M`` weight (``M = V + 2D + 4``) sits in registers over ``NVT`` column tiles of
the block's threads, which limits ``M`` to ``NVT * BV`` with ``NVT <= 8`` (:func:`rejects`).
The kernel reads the caller's layout; packed sequences are handled inside, so a whole batch is
one launch. Without an initial state every sequence starts from ``W0`` (read in place). A
decoding pool of the compute dtype and C order is updated in place through ``state_indices``,
any other through a copy of its rows.
"""

from __future__ import annotations

import dataclasses
import threading
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from fastweights.backends import Call, gather_rows, write_rows

from . import _launch as L
from ._recurrent import _device_key, _module_of, _on_device

_SOURCES = ("common.cuh", "recurrent.cu", "srwm.cu")
NVTS = (1, 2, 4, 8)
"""Column tiles per thread (compile time): ``M <= NVT * BV``."""
H0_SHARED = 128
"""``fw_srwm``'s flag: ``h0`` is ``W0 [H, D, M]``, the same for every sequence."""


@cache
def source() -> str:
    """The CUDA C++ source of ``fw_srwm`` (with the shared helpers and flag bits)."""
    root = resources.files("fastweights.backends.cupy").joinpath("kernels")
    return "\n".join(root.joinpath(name).read_text() for name in _SOURCES)


def name_expression(tin: str, tc: str, tile: L.Tile, nvt: int) -> str:
    """``fw_srwm<Tin, Tc, KPT, KSPLIT, BV, NVT>`` for ``name_expressions``."""
    return f"fw_srwm<{tin}, {tc}, {tile.kpt}, {tile.ksplit}, {tile.bv}, {nvt}>"


def group(tin: str, tc: str, tile: L.Tile) -> tuple[str, ...]:
    """The instantiations compiled together: every ``NVT`` of one dtype pair and tile."""
    return tuple(name_expression(tin, tc, tile, n) for n in NVTS)


def nvt_for(M: int, tile: L.Tile) -> int | None:
    """The fewest column tiles per thread that cover ``M`` columns, or None past the last."""
    return next((n for n in NVTS if n * tile.bv >= M), None)


def _compute(call: Call) -> str:
    return "float64" if np.dtype(call.dtype) == np.float64 else "float32"


def rejects(call: Call) -> str | None:
    """Why ``fw_srwm`` cannot hold ``call``'s weight in registers, or None."""
    tile = L.tile_for(call.K, _compute(call))
    M = call.V + 2 * call.K + 4
    if nvt_for(M, tile) is None:
        most = NVTS[-1] * tile.bv
        return f"srwm keeps a head's weight in one block: V + 2D + 4 <= {most} at D = {call.K}"
    return None


_lock = threading.Lock()
_modules: dict[tuple[Any, ...], Any] = {}


def _kernel(device: Any, name: str, names: tuple[str, ...]) -> Any:
    key = (device, source(), L.OPTIONS, names)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            if device == "emulator":
                from .emulator import RawModule

                mod = RawModule(source(), L.OPTIONS, name_expressions=names)
            else:
                import cupy

                mod = cupy.RawModule(code=source(), options=L.OPTIONS, name_expressions=names)
            _modules[key] = mod
    return mod.get_function(name)


def _dtypes(call: Call) -> tuple[Any, Any]:
    """``(input dtype, compute dtype)``: float16 ``x`` stays float16 (float32 compute)."""
    if np.dtype(call.dtype) == np.float64:
        return np.float64, np.float64
    if np.dtype(call.x.dtype) == np.float16:
        return np.float16, np.float32
    return np.float32, np.float32


def _launch(call: Call, mp: Any, *, h0: Any, ht: Any, o: Any, state_idx: Any, tin: Any, tc: Any):
    dummy_c = mp.empty(1, dtype=tc)
    dummy_i = mp.empty(1, dtype=np.int64)
    flags = 0
    cu = dummy_i
    if call.cu_seqlens is not None:
        cu = mp.asarray(call.cu_seqlens, dtype=np.int64)
        flags |= L.HAS_CU
    if h0 is None:
        h0 = mp.ascontiguousarray(call.W0, dtype=tc)
        flags |= H0_SHARED
    flags |= L.HAS_H0 | (L.HAS_HT if ht is not None else 0)
    if state_idx is not None:
        flags |= L.HAS_IDX
    tile = L.tile_for(call.K, np.dtype(tc).name)
    nvt = nvt_for(call.V + 2 * call.K + 4, tile)
    if nvt is None:
        raise ValueError(rejects(call))
    names = group(L.ctype(tin), L.ctype(tc), tile)
    name = name_expression(L.ctype(tin), L.ctype(tc), tile, nvt)
    args = (
        mp.ascontiguousarray(call.x, dtype=tin),
        h0,
        dummy_c if ht is None else ht,
        o,
        cu,
        dummy_i if state_idx is None else state_idx,
        L.int32("T", call.T),
        L.int32("H", call.H),
        L.int32("D", call.K),
        L.int32("V", call.V),
        np.int32(flags),
    )
    grid = (call.N, call.H)
    if min(grid) <= 0:
        return
    _kernel(_device_key(call), name, names)(grid, (tile.threads,), args)


def _run(call: Call, mp: Any, *, state_idx: Any = None, pool: Any = None) -> tuple[Any, Any]:
    tin, tc = _dtypes(call)
    M = call.V + 2 * call.K + 4
    if pool is not None:
        h0 = ht = pool
    else:
        h0 = call.initial_state
        h0 = None if h0 is None else mp.ascontiguousarray(h0, dtype=tc)
        ht = None
        if call.output_final_state:
            ht = mp.empty((call.N, call.H, call.K, M), dtype=tc)
    o = mp.empty((call.B, call.T, call.H, call.V), dtype=tin)
    _launch(call, mp, h0=h0, ht=ht, o=o, state_idx=state_idx, tin=tin, tc=tc)
    if np.dtype(call.x.dtype) != np.dtype(tin):
        with np.errstate(over="ignore", invalid="ignore"):
            o = o.astype(call.x.dtype)
    return o, ht


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of an ``srwm`` sequence call."""
    mp = _module_of(call)
    with _on_device(call):
        return _run(call, mp)


def step(call: Call) -> tuple[Any, Any]:
    """One decoding step; the pool is updated in place (``fastweights.step``)."""
    mp = _module_of(call)
    _, tc = _dtypes(call)
    pool = call.state_pool
    if getattr(getattr(pool, "flags", None), "writeable", True) is False:
        raise ValueError("state is read-only, but the state pool is updated in place")
    idx = call.state_indices
    seq = dataclasses.replace(call, state_pool=None, state_indices=None, output_final_state=True)
    with _on_device(call):
        if np.dtype(pool.dtype) == np.dtype(tc) and pool.flags.c_contiguous:
            dev_idx = None if idx is None else mp.asarray(idx, dtype=np.int64)
            o, _ = _run(seq, mp, state_idx=dev_idx, pool=pool)
        else:
            seq = dataclasses.replace(seq, initial_state=gather_rows(call.xp, pool, idx))
            o, final = _run(seq, mp)
            write_rows(call.xp, pool, idx, final)
    return o[:, 0, ...], pool


__all__ = ["group", "name_expression", "rejects", "run", "source", "step"]
