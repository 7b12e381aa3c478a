"""The chunk form on the GPU: three kernels of ``kernels/chunk.cu`` over the head-major problem.

``prepare`` (:mod:`fastweights.rules.delta._layout`, the Array API code every form shares) turns
the call into the general rule's ``[N, HV, R, D]`` arrays on the call's own device (CuPy, or
NumPy under emulation): packed sequences zero-padded, grouped heads expanded, ``q`` and ``k``
L2-normalised and ``q`` scaled, DeltaProduct's steps interleaved, the normaliser of
``linear_attn`` a value column of ones. Then, each one launch for the whole batch:

1. ``fw_chunk_prep`` (one block per chunk of every head): the decayed scores ``P``, ``Qd``,
   ``Kd``, the chunk's log-decay ``D``, and for the delta rules the UT solve ``W``, ``U``;
2. ``fw_chunk_state`` (one block per head and value tile): the sequential pass over chunks,
   state in registers: ``U' = U - W S``, ``O = Qd S``, ``S <- exp(D) S + Kd^T U'``;
3. ``fw_chunk_output`` (one block per chunk of every head): ``O += P U'``.

Scratch in the compute dtype: ``W, Qd, Kd`` and ``U'`` (and ``U``) ``O(N HV R (K + V))``,
``P`` ``O(N HV R C)``; never a state per chunk or per token.
"""

from __future__ import annotations

import threading
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from fastweights.backends import SUB_BLOCK, Call

from . import _launch as L
from ._recurrent import _device_key, _dtypes, _module_of, _on_device

GATE_HEAD, GATE_KEY, ERASE = 1, 2, 4
"""Bits of the compile-time ``MODE`` of the chunk kernels."""
MODES = tuple(gate | erase for gate in (0, GATE_HEAD, GATE_KEY) for erase in (0, ERASE))
HAS_HT = 1
CHUNK = {"float32": 64, "float64": 32}
"""Chunk capacity ``C`` of the kernels per compute dtype (shared memory: the ``C x C`` matrix of
the UT solve and the key tiles stay under 48 KiB); a call's ``chunk_size`` is capped by it."""
THREADS = 256
_SOURCES = ("common.cuh", "chunk.cu")


@cache
def source() -> str:
    """The CUDA C++ source of the chunk kernels (with the shared helpers)."""
    root = resources.files("fastweights.backends.cupy").joinpath("kernels")
    return "\n".join(root.joinpath(name).read_text() for name in _SOURCES)


def capacity(compute: Any) -> int:
    """``C``, the largest chunk the kernels of compute dtype ``compute`` take."""
    return CHUNK[np.dtype(compute).name]


def prep_name(tc: str, C: int, mode: int) -> str:
    return f"fw_chunk_prep<{tc}, {C}, {SUB_BLOCK}, {mode}>"


def state_name(tc: str, tile: L.Tile, C: int, mode: int) -> str:
    return f"fw_chunk_state<{tc}, {tile.kpt}, {tile.ksplit}, {tile.bv}, {C}, {mode}>"


def output_name(tc: str, C: int) -> str:
    return f"fw_chunk_output<{tc}, {C}>"


def parallel_group(compute: Any) -> tuple[str, ...]:
    """The instantiations of the chunk-parallel kernels of one compute dtype (one module)."""
    tc, C = L.ctype(compute), capacity(compute)
    return (*(prep_name(tc, C, m) for m in MODES), output_name(tc, C))


def state_group(compute: Any, tile: L.Tile) -> tuple[str, ...]:
    """The instantiations of the sequential kernel for one compute dtype and tile (one module)."""
    tc, C = L.ctype(compute), capacity(compute)
    return tuple(state_name(tc, tile, C, m) for m in MODES)


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


def _launch(device: Any, name: str, names: tuple[str, ...], grid: int, block: int, args: Any):
    if grid <= 0:
        return
    _kernel(device, name, names)((grid,), (block,), args)


def chunk_size(call: Call) -> int:
    """The chunk size the kernels run ``call`` with: ``call.chunk_size`` capped by ``C``."""
    return max(1, min(call.chunk_size, capacity(_dtypes(call)[1])))


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call in the chunk form."""
    from fastweights.rules.delta._layout import prepare

    mp = _module_of(call)
    with _on_device(call):
        p, finish = prepare(call)
        o, state = _run_problem(
            mp,
            _device_key(call),
            p,
            _dtypes(call)[1],
            chunk_size(call),
            want_state=call.output_final_state,
        )
        return finish(o, state)


def _run_problem(
    mp: Any, device: Any, p: Any, tc: Any, cs: int, *, want_state: bool
) -> tuple[Any, Any]:
    """The chunk kernels on a :class:`~fastweights.rules.delta._layout.Problem`."""
    N, HV, R, K = p.k.shape
    V = p.v.shape[-1]
    NH = N * HV
    tname = np.dtype(tc).name
    ct, C = L.ctype(tc), capacity(tc)

    def arg(x: Any) -> Any:
        return mp.ascontiguousarray(x, dtype=tc)

    q, k, v, h0 = arg(p.q), arg(p.k), arg(p.v), arg(p.state)
    if R == 0:
        return mp.zeros((N, HV, 0, V), dtype=tc), h0
    cs = min(cs, R)
    nc = -(-R // cs)
    rows = nc * cs
    mode = 0
    G = 1
    dummy = mp.empty(1, dtype=tc)
    g = beta = dummy
    if p.log_decay is not None:
        G = p.log_decay.shape[-1]
        mode |= GATE_KEY if G > 1 else GATE_HEAD  # one key channel: a per-head gate
        g = arg(p.log_decay)
    if p.erase:
        mode |= ERASE
        beta = arg(p.beta)
        if beta.shape[-1] != 1:
            raise ValueError("a per-value beta has no chunk form")
    W = mp.empty((NH, rows, K), dtype=tc) if p.erase else dummy
    U = mp.empty((NH, rows, V), dtype=tc) if p.erase else dummy
    Qd = mp.empty((NH, rows, K), dtype=tc)
    Kd = mp.empty((NH, rows, K), dtype=tc)
    P = mp.empty((NH, nc, cs, cs), dtype=tc)
    D = mp.empty((NH, nc, G), dtype=tc) if p.log_decay is not None else dummy
    O = mp.empty((NH, R, V), dtype=tc)
    Up = mp.empty((NH, rows, V), dtype=tc)
    ht = mp.empty((NH, K, V), dtype=tc) if want_state else dummy
    i32 = L.int32
    sizes = (i32("R", R), i32("K", K), i32("V", V), i32("chunk", cs), i32("chunks", nc))
    par = parallel_group(tc)
    _launch(
        device,
        prep_name(ct, C, mode),
        par,
        NH * nc,
        THREADS,
        (q, k, v, g, beta, W, U, Qd, Kd, P, D, *sizes),
    )
    tile = L.tile_for(K, tname)
    n_vt = -(-V // tile.bv)
    _launch(
        device,
        state_name(ct, tile, C, mode),
        state_group(tc, tile),
        NH * n_vt,
        tile.threads,
        (Qd, Kd, W, U if p.erase else v, D, h0, ht, O, Up, *sizes, np.int32(HAS_HT * want_state)),
    )
    _launch(
        device,
        output_name(ct, C),
        par,
        NH * nc,
        THREADS,
        (P, Up, O, sizes[0], sizes[2], sizes[3], sizes[4]),
    )
    o = mp.reshape(O, (N, HV, R, V))
    return o, (mp.reshape(ht, (N, HV, K, V)) if want_state else None)
