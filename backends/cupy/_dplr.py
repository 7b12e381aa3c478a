"""From a validated ``dplr`` call (``iplr`` and ``rwkv7`` arrive rewritten into it) to one
launch of ``fw_dplr`` (``kernels/dplr.cu``), and back; decoding steps into a state pool.

As ``_recurrent.py``: the kernel reads the caller's layout (``q, k [B, T, H, K]``,
``a, b, gk [B, T, HV, K]``, ``v [B, T, HV, V]``), made C-contiguous and cast to the kernel's
input type where needed; packed sequences, grouped heads, ``use_qk_l2norm`` and ``scale`` are
handled inside, so a whole (packed) batch is one launch. A decoding state pool of the compute
dtype and C order is updated in place through ``state_indices``; any other goes through a
copy of its rows, written back.
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

_SOURCES = ("common.cuh", "recurrent.cu", "dplr.cu")
GATES = (0, 1)
"""``GATE`` of ``fw_dplr``: without ``gk`` (``iplr``) and with it."""


@cache
def source() -> str:
    """The CUDA C++ source of ``fw_dplr`` (with the shared helpers and flag bits)."""
    root = resources.files("fastweights.backends.cupy").joinpath("kernels")
    return "\n".join(root.joinpath(name).read_text() for name in _SOURCES)


def name_expression(tin: str, tc: str, tile: L.Tile, gate: int) -> str:
    """``fw_dplr<Tin, Tc, KPT, KSPLIT, BV, GATE>`` for ``name_expressions``."""
    return f"fw_dplr<{tin}, {tc}, {tile.kpt}, {tile.ksplit}, {tile.bv}, {gate}>"


def group(tin: str, tc: str, tile: L.Tile) -> tuple[str, ...]:
    """The instantiations compiled together: both gates of one dtype pair and tile."""
    return tuple(name_expression(tin, tc, tile, g) for g in GATES)


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
    """``(input dtype, compute dtype)``: float16 inputs stay float16 only when they all are."""
    if np.dtype(call.dtype) == np.float64:
        return np.float64, np.float64
    arrays = [x for x in (call.q, call.k, call.v, call.a, call.b, call.gk) if x is not None]
    if all(np.dtype(x.dtype) == np.float16 for x in arrays):
        return np.float16, np.float32
    return np.float32, np.float32


def _launch(call: Call, mp: Any, *, h0: Any, ht: Any, o: Any, state_idx: Any, tin: Any, tc: Any):
    def arg(x: Any) -> Any:
        return mp.ascontiguousarray(x, dtype=tin)

    # Stand-ins for absent arrays (never read: `flags` says what is there).
    dummy_in, dummy_c = mp.empty(1, dtype=tin), mp.empty(1, dtype=tc)
    dummy_i = mp.empty(1, dtype=np.int64)
    flags = L.L2NORM if call.use_qk_l2norm else 0
    cu = dummy_i
    if call.cu_seqlens is not None:
        cu = mp.asarray(call.cu_seqlens, dtype=np.int64)
        flags |= L.HAS_CU
    flags |= (L.HAS_H0 if h0 is not None else 0) | (L.HAS_HT if ht is not None else 0)
    if state_idx is not None:
        flags |= L.HAS_IDX
    tile = L.tile_for(call.K, np.dtype(tc).name)
    gate = 0 if call.gk is None else 1
    names = group(L.ctype(tin), L.ctype(tc), tile)
    name = name_expression(L.ctype(tin), L.ctype(tc), tile, gate)
    n_vt = -(-call.V // tile.bv)
    args = (
        arg(call.q),
        arg(call.k),
        arg(call.v),
        arg(call.a),
        arg(call.b),
        dummy_in if call.gk is None else arg(call.gk),
        dummy_c if h0 is None else h0,
        dummy_c if ht is None else ht,
        o,
        cu,
        dummy_i if state_idx is None else state_idx,
        L.int32("T", call.T),
        L.int32("H", call.H),
        L.int32("HV", call.HV),
        L.int32("K", call.K),
        L.int32("V", call.V),
        np.dtype(tc).type(call.scale),
        np.int32(flags),
    )
    grid = (call.N * n_vt, call.HV)
    if min(grid) <= 0:
        return
    _kernel(_device_key(call), name, names)(grid, (tile.threads,), args)


def _run(call: Call, mp: Any, *, state_idx: Any = None, pool: Any = None) -> tuple[Any, Any]:
    tin, tc = _dtypes(call)
    if pool is not None:
        h0 = ht = pool
    else:
        h0 = call.initial_state
        h0 = None if h0 is None else mp.ascontiguousarray(h0, dtype=tc)
        ht = None
        if call.output_final_state:
            ht = mp.empty((call.N, call.HV, call.K, call.V), dtype=tc)
    o = mp.empty((call.B, call.T, call.HV, call.V), dtype=tin)
    _launch(call, mp, h0=h0, ht=ht, o=o, state_idx=state_idx, tin=tin, tc=tc)
    if np.dtype(call.v.dtype) != np.dtype(tin):
        with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is inf, as on GPU
            o = o.astype(call.v.dtype)
    return o, ht


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a ``dplr`` sequence call with the recurrent kernel."""
    mp = _module_of(call)
    with _on_device(call):
        return _run(call, mp)


def step(call: Call) -> tuple[Any, Any]:
    """One ``dplr`` decoding step; the pool is updated in place (``fastweights.step``)."""
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


__all__ = ["group", "name_expression", "run", "source", "step"]
