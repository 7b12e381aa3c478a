"""From a validated call to one launch of ``fw_recurrent``, and back.

The kernel reads the caller's layout directly (``q, k [B, T, H, K]``, ``v [B, T*n, HV, V]``,
...), made C-contiguous and cast to the kernel's input type where needed; packed sequences
(``cu_seqlens``), grouped heads, ``use_qk_l2norm``, ``scale`` and DeltaProduct's ``n`` steps per
token are handled inside the kernel, so a whole (packed) batch is one launch. The caller's
arrays are only read; a decoding state pool is updated in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np

from fastweights.backends import Call, gather_rows, write_rows

from . import _launch as L

_EMULATOR = "emulator"


def _is_numpy(xp: Any) -> bool:
    return getattr(xp, "__name__", "").split(".")[-1] == "numpy"


def _module_of(call: Call) -> Any:
    """The array module of the call's arrays (NumPy under emulation, else CuPy)."""
    if _is_numpy(call.xp):
        return np
    import cupy

    return cupy


def _device_key(call: Call) -> Any:
    return _EMULATOR if _is_numpy(call.xp) else int(call.device.id)


def _dtypes(call: Call) -> tuple[Any, Any]:
    """``(input dtype, compute dtype)`` of the kernel: float16 inputs stay float16 only when
    they all are; mixed inputs are cast to the compute dtype."""
    if np.dtype(call.dtype) == np.float64:
        return np.float64, np.float64
    arrays = [x for x in (call.q, call.k, call.v, call.gate, call.beta) if x is not None]
    if all(np.dtype(x.dtype) == np.float16 for x in arrays):
        return np.float16, np.float32
    return np.float32, np.float32


def _mode(call: Call) -> int:
    mode = 0
    if call.gate is not None:
        mode = L.GATE_KEY if call.spec.gate == "gk" else L.GATE_HEAD
    if call.beta is not None:
        mode |= L.BETA_VALUE if call.beta_per_value else L.BETA_HEAD
    if call.normalize:
        mode |= L.NORMALIZE
    return mode


def _launch(
    call: Call,
    mp: Any,
    *,
    h0: Any,
    ht: Any,
    z0: Any,
    zt: Any,
    o: Any,
    state_idx: Any,
    tin: Any,
    tc: Any,
) -> None:
    """Launch ``fw_recurrent`` for ``call`` writing ``o`` (and ``ht``/``zt`` when given)."""

    def arg(x: Any, dtype: Any) -> Any:
        return mp.ascontiguousarray(x, dtype=dtype)

    # Stand-ins for absent arrays (never read: `flags` says what is there). CuPy would turn a
    # None argument into an invalid, non-null pointer.
    dummy_in, dummy_c = mp.empty(1, dtype=tin), mp.empty(1, dtype=tc)
    dummy_i = mp.empty(1, dtype=np.int64)
    flags = 0
    if call.use_qk_l2norm:
        flags |= L.L2NORM
    cu = dummy_i
    if call.cu_seqlens is not None:
        cu = mp.asarray(call.cu_seqlens, dtype=np.int64)
        flags |= L.HAS_CU
    for bit, x in ((L.HAS_H0, h0), (L.HAS_HT, ht), (L.HAS_Z0, z0), (L.HAS_ZT, zt)):
        flags |= bit if x is not None else 0
    if state_idx is not None:
        flags |= L.HAS_IDX
    tile = L.tile_for(call.K, np.dtype(tc).name)
    names = L.group(L.ctype(tin), L.ctype(tc), tile)
    name = L.name_expression(L.ctype(tin), L.ctype(tc), tile, _mode(call))
    n_vt = -(-call.V // tile.bv)
    gate = call.gate
    args = (
        arg(call.q, tin),
        arg(call.k, tin),
        arg(call.v, tin),
        dummy_in if gate is None else arg(gate, tin),
        dummy_in if call.beta is None else arg(call.beta, tin),
        dummy_c if h0 is None else h0,
        dummy_c if ht is None else ht,
        dummy_c if z0 is None else z0,
        dummy_c if zt is None else zt,
        o,
        cu,
        dummy_i if state_idx is None else state_idx,
        L.int32("T", call.T),
        L.int32("H", call.H),
        L.int32("HV", call.HV),
        L.int32("K", call.K),
        L.int32("V", call.V),
        L.int32("num_householder", call.num_householder),
        np.dtype(tc).type(call.scale),
        np.int32(flags),
    )
    L.launch(_device_key(call), name, names, (call.N * n_vt, call.HV), (tile.threads,), args)


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call with the recurrent kernel."""
    mp = _module_of(call)
    with _on_device(call):
        return _run(call, mp)


def _run(call: Call, mp: Any, *, state_idx: Any = None, pools: Any = None) -> tuple[Any, Any]:
    tin, tc = _dtypes(call)
    N, HV, K, V = call.N, call.HV, call.K, call.V
    S0 = z0 = None
    if pools is not None:
        S0, z0 = pools
    elif call.initial_state is not None:
        S0, z0 = call.initial_state if call.normalize else (call.initial_state, None)
        S0 = mp.ascontiguousarray(S0, dtype=tc)
        z0 = None if z0 is None else mp.ascontiguousarray(z0, dtype=tc)
    if pools is not None:
        ht, zt = pools
    elif call.output_final_state:
        ht = mp.empty((N, HV, K, V), dtype=tc)
        zt = mp.empty((N, HV, K), dtype=tc) if call.normalize else None
    else:
        ht = zt = None
    o = mp.empty((call.B, call.T, HV, V), dtype=tin)
    _launch(call, mp, h0=S0, ht=ht, z0=z0, zt=zt, o=o, state_idx=state_idx, tin=tin, tc=tc)
    if np.dtype(call.v.dtype) != np.dtype(tin):
        with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is inf, as on GPU
            o = o.astype(call.v.dtype)
    if ht is None:
        return o, None
    return o, ((ht, zt) if call.normalize else ht)


def step(call: Call) -> tuple[Any, Any]:
    """One decoding step; the pool is updated in place (``fastweights.step``)."""
    mp = _module_of(call)
    _, tc = _dtypes(call)
    pools = tuple(call.state_pool) if call.normalize else (call.state_pool,)
    for p in pools:  # validation refuses these; the kernel must never write through one
        if getattr(getattr(p, "flags", None), "writeable", True) is False:
            raise ValueError("state is read-only, but the state pool is updated in place")
    idx = call.state_indices
    seq = dataclasses.replace(call, state_pool=None, state_indices=None, output_final_state=True)
    with _on_device(call):
        direct = all(np.dtype(p.dtype) == np.dtype(tc) and p.flags.c_contiguous for p in pools)
        if direct:
            dev_idx = None if idx is None else mp.asarray(idx, dtype=np.int64)
            pair = (pools[0], pools[1] if call.normalize else None)
            o, _ = _run(seq, mp, state_idx=dev_idx, pools=pair)
        else:
            current = tuple(gather_rows(call.xp, p, idx) for p in pools)
            seq = dataclasses.replace(seq, initial_state=current if call.normalize else current[0])
            o, final = _run(seq, mp)
            finals = final if call.normalize else (final,)
            for p, new in zip(pools, finals, strict=True):
                write_rows(call.xp, p, idx, new)
    return o[:, 0, ...], call.state_pool


def _on_device(call: Call) -> Any:
    """Context making the call's device current (a no-op under emulation)."""
    return contextlib.nullcontext() if _is_numpy(call.xp) else call.device
