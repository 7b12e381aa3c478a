"""From a validated ``recurrent_delta_rule`` call to one launch of ``fw_rdelta``
(``kernels/recurrent_delta.cu``), and back; decoding steps into a state pool.

Each token's inputs depend on the whole previous output, so a block owns a whole (sequence,
head): the ``K x V`` state sits in registers over ``NVT`` value tiles of the block's threads,
which limits ``V`` to ``NVT * BV`` with ``NVT <= 4`` (:func:`rejects`). The kernel reads the
caller's layout (made C-contiguous and cast to the kernel's input type where needed); packed
sequences are handled inside, so a whole batch is one launch. The state is the pair
``(S [N, H, K, V], o_last [N, H, V])``; a decoding pool pair of the compute dtype and C order is
updated in place through ``state_indices``, any other through a copy of its rows.
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

_SOURCES = ("common.cuh", "recurrent.cu", "recurrent_delta.cu")
NVTS = (1, 2, 4)
"""Value tiles per thread (compile time): ``V <= NVT * BV``."""


@cache
def source() -> str:
    """The CUDA C++ source of ``fw_rdelta`` (with the shared helpers and flag bits)."""
    root = resources.files("fastweights.backends.cupy").joinpath("kernels")
    return "\n".join(root.joinpath(name).read_text() for name in _SOURCES)


def name_expression(tin: str, tc: str, tile: L.Tile, nvt: int) -> str:
    """``fw_rdelta<Tin, Tc, KPT, KSPLIT, BV, NVT>`` for ``name_expressions``."""
    return f"fw_rdelta<{tin}, {tc}, {tile.kpt}, {tile.ksplit}, {tile.bv}, {nvt}>"


def group(tin: str, tc: str, tile: L.Tile) -> tuple[str, ...]:
    """The instantiations compiled together: every ``NVT`` of one dtype pair and tile."""
    return tuple(name_expression(tin, tc, tile, n) for n in NVTS)


def nvt_for(V: int, tile: L.Tile) -> int | None:
    """The fewest value tiles per thread that cover ``V`` columns, or None past the last."""
    return next((n for n in NVTS if n * tile.bv >= V), None)


def _compute(call: Call) -> str:
    return "float64" if np.dtype(call.dtype) == np.float64 else "float32"


def rejects(call: Call) -> str | None:
    """Why ``fw_rdelta`` cannot hold ``call``'s state in registers, or None."""
    tile = L.tile_for(call.K, _compute(call))
    if nvt_for(call.V, tile) is None:
        most = NVTS[-1] * tile.bv
        return (
            f"recurrent_delta_rule keeps a head's state in one block: V <= {most} at K = {call.K}"
        )
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


_NAMES = ("beta", "R_q", "R_k", "R_v", "r_beta")


def _dtypes(call: Call) -> tuple[Any, Any]:
    """``(input dtype, compute dtype)``: float16 inputs stay float16 only when they all are."""
    if np.dtype(call.dtype) == np.float64:
        return np.float64, np.float64
    arrays = [call.q, call.k, call.v, *(call.inputs[n] for n in _NAMES)]
    if all(np.dtype(x.dtype) == np.float16 for x in arrays):
        return np.float16, np.float32
    return np.float32, np.float32


def _launch(call: Call, mp: Any, *, s0: Any, st: Any, o: Any, state_idx: Any, tin: Any, tc: Any):
    def arg(x: Any) -> Any:
        return mp.ascontiguousarray(x, dtype=tin)

    dummy_c = mp.empty(1, dtype=tc)
    dummy_i = mp.empty(1, dtype=np.int64)
    flags = 0
    cu = dummy_i
    if call.cu_seqlens is not None:
        cu = mp.asarray(call.cu_seqlens, dtype=np.int64)
        flags |= L.HAS_CU
    flags |= (L.HAS_H0 if s0 is not None else 0) | (L.HAS_HT if st is not None else 0)
    if state_idx is not None:
        flags |= L.HAS_IDX
    tile = L.tile_for(call.K, np.dtype(tc).name)
    nvt = nvt_for(call.V, tile)
    if nvt is None:
        raise ValueError(rejects(call))
    names = group(L.ctype(tin), L.ctype(tc), tile)
    name = name_expression(L.ctype(tin), L.ctype(tc), tile, nvt)
    S0, l0 = (dummy_c, dummy_c) if s0 is None else s0
    St, lt = (dummy_c, dummy_c) if st is None else st
    args = (
        arg(call.q),
        arg(call.k),
        arg(call.v),
        *(arg(call.inputs[n]) for n in _NAMES),
        S0,
        l0,
        St,
        lt,
        o,
        cu,
        dummy_i if state_idx is None else state_idx,
        L.int32("T", call.T),
        L.int32("H", call.H),
        L.int32("K", call.K),
        L.int32("V", call.V),
        np.dtype(tc).type(call.scale),
        np.int32(flags),
    )
    grid = (call.N, call.H)
    if min(grid) <= 0:
        return
    _kernel(_device_key(call), name, names)(grid, (tile.threads,), args)


def _run(call: Call, mp: Any, *, state_idx: Any = None, pool: Any = None) -> tuple[Any, Any]:
    tin, tc = _dtypes(call)
    if pool is not None:
        s0 = st = pool
    else:
        s0 = call.initial_state
        if s0 is not None:
            s0 = tuple(mp.ascontiguousarray(x, dtype=tc) for x in s0)
        st = None
        if call.output_final_state:
            st = (
                mp.empty((call.N, call.H, call.K, call.V), dtype=tc),
                mp.empty((call.N, call.H, call.V), dtype=tc),
            )
    o = mp.empty((call.B, call.T, call.H, call.V), dtype=tin)
    _launch(call, mp, s0=s0, st=st, o=o, state_idx=state_idx, tin=tin, tc=tc)
    if np.dtype(call.v.dtype) != np.dtype(tin):
        with np.errstate(over="ignore", invalid="ignore"):
            o = o.astype(call.v.dtype)
    return o, st


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a ``recurrent_delta_rule`` sequence call."""
    mp = _module_of(call)
    with _on_device(call):
        return _run(call, mp)


def step(call: Call) -> tuple[Any, Any]:
    """One decoding step; the pool pair is updated in place (``fastweights.step``)."""
    mp = _module_of(call)
    _, tc = _dtypes(call)
    pools = tuple(call.state_pool)
    for p in pools:
        if getattr(getattr(p, "flags", None), "writeable", True) is False:
            raise ValueError("state is read-only, but the state pool is updated in place")
    idx = call.state_indices
    seq = dataclasses.replace(call, state_pool=None, state_indices=None, output_final_state=True)
    with _on_device(call):
        if all(np.dtype(p.dtype) == np.dtype(tc) and p.flags.c_contiguous for p in pools):
            dev_idx = None if idx is None else mp.asarray(idx, dtype=np.int64)
            o, _ = _run(seq, mp, state_idx=dev_idx, pool=pools)
        else:
            current = tuple(gather_rows(call.xp, p, idx) for p in pools)
            o, final = _run(dataclasses.replace(seq, initial_state=current), mp)
            for p, new in zip(pools, final, strict=True):
                write_rows(call.xp, p, idx, new)
    return o[:, 0, ...], call.state_pool


__all__ = ["group", "name_expression", "rejects", "run", "source", "step"]
