"""Python side of the numba backend: choose the form, prepare arguments, call the kernels.

Imported on a backend's first call, never when fastweights is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from fastweights.backends import NORMALIZE_EPS, Call

from ._layout import (
    Args,
    as_rows,
    call_kernel,
    dummy,
    kernel_args,
    launch,
    sequences,
    tasks,
    uniform_tasks,
    unit_last,
)
from ._plan import plan
from .recurrent import recurrent_kernel
from .step import step_kernel


def _initial(call: Call, dt: np.dtype) -> np.ndarray | None:
    init = call.initial_state
    if init is None:
        return None
    if call.normalize:
        S, z = init
        # concatenate keeps a Fortran-like order of its inputs: the kernel needs C rows.
        both = np.concatenate([np.asarray(S, dt), np.asarray(z, dt)[..., None]], axis=-1)
        return np.ascontiguousarray(both)
    return as_rows(init, dt)


def _recurrent(
    call: Call,
    a: Args,
    state_in: np.ndarray | None,
    in_rows: np.ndarray,
    state_out: np.ndarray | None,
    out_rows: np.ndarray,
    n: int,
) -> np.ndarray:
    """Run the recurrent kernel on ``n`` threads; returns ``o [B, T, HV, V']`` in the compute
    dtype."""
    dt = a.v.dtype
    seq_b, t0, t1 = sequences(call)
    if call.cu_seqlens is None:
        ts, th, tv0, tv1 = uniform_tasks(call.B, call.T, call.HV, a.V, n)
    else:
        ts, th, tv0, tv1 = tasks(t1 - t0, call.HV, a.V, n)
    o = np.empty((call.B, call.T, call.HV, a.V), dtype=dt)
    with launch(n):
        call_kernel(
            recurrent_kernel,
            a.q, a.k, a.v, a.gate, a.beta,
            dummy(dt) if state_in is None else state_in, in_rows,
            dummy(dt) if state_out is None else state_out, out_rows,
            o, seq_b, t0, t1, ts, th, tv0, tv1,
            a.n_sub, a.G, a.gate_kind, a.erase, a.beta_per_value,
            state_in is not None, state_out is not None, a.l2norm, a.scale,
        )  # fmt: skip
    return o


def _chunk(
    call: Call,
    a: Args,
    state_in: np.ndarray | None,
    in_rows: np.ndarray,
    state_out: np.ndarray | None,
    out_rows: np.ndarray,
    n: int,
    chunk_size: int,
) -> np.ndarray:
    """Run the chunk-form kernel on ``n`` threads; returns ``o [B, T, HV, V']`` in the compute
    dtype."""
    from .chunk import chunk_kernel

    dt = a.v.dtype
    seq_b, t0, t1 = sequences(call)
    N, HV = seq_b.shape[0], call.HV
    order = np.argsort(-np.repeat(t1 - t0, HV), kind="stable")
    ts = np.repeat(np.arange(N, dtype=np.int64), HV)[order]
    th = np.tile(np.arange(HV, dtype=np.int64), N)[order]
    o = np.empty((call.B, call.T, HV, a.V), dtype=dt)
    with launch(n):
        call_kernel(
            chunk_kernel,
            a.q, a.k, a.v, a.gate, a.beta,
            dummy(dt) if state_in is None else state_in, in_rows,
            dummy(dt) if state_out is None else state_out, out_rows,
            o, seq_b, t0, t1, ts, th,
            a.n_sub, a.G, a.gate_kind, a.erase,
            state_in is not None, state_out is not None, a.l2norm, a.scale,
            int(chunk_size),
        )  # fmt: skip
    return o


def _finish_o(call: Call, o: np.ndarray) -> np.ndarray:
    if call.normalize:
        o = o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)
    return o.astype(call.v.dtype, copy=False)


def _split_state(call: Call, S: np.ndarray) -> Any:
    return (S[..., :-1], S[..., -1]) if call.normalize else S


OWN_MODULES = {
    "dplr": "dplr",
    "mesa_net": "mesa",
    "recurrent_delta_rule": "recurrent_delta",
    "srwm": "srwm",
}
"""Ops whose kernels live in a module of their own (``run`` and ``step``), by op."""


def _own_module(op: str) -> Any:
    return importlib.import_module(f"{__package__}.{OWN_MODULES[op]}")


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call."""
    if call.op in OWN_MODULES:
        return _own_module(call.op).run(call)
    chosen = plan(call)
    a = kernel_args(call)
    dt = a.v.dtype
    rows = np.arange(call.N, dtype=np.int64)
    final = None
    if call.output_final_state:
        final = np.empty((call.N, call.HV, call.K, a.V), dtype=dt)
    n = chosen["threads"]
    if chosen["form"] == "chunk":
        o = _chunk(call, a, _initial(call, dt), rows, final, rows, n, chosen["chunk_size"])
    else:
        o = _recurrent(call, a, _initial(call, dt), rows, final, rows, n)
    return _finish_o(call, o), (None if final is None else _split_state(call, final))


def step(call: Call) -> tuple[Any, Any]:
    """One decoding step; the pool is updated in place through ``state_indices``.

    A pool of the compute dtype whose last axis is contiguous is updated by the step kernel
    in place; any other (another dtype, a strided last axis, the ``(S, z)`` pair) goes through
    a C-ordered copy of its rows and the recurrent kernel, then is written back. Validation has
    refused read-only pools and copied inputs that view the pool.
    """
    if call.op in OWN_MODULES:
        return _own_module(call.op).step(call)
    pools = call.state_pool if call.normalize else (call.state_pool,)
    a = kernel_args(call)
    dt = a.v.dtype
    pool = call.state_pool
    idx = call.state_indices
    rows = np.arange(call.N, dtype=np.int64) if idx is None else idx
    if not call.normalize and pool.dtype == dt and unit_last(pool):
        o = np.empty((call.N, 1, call.HV, a.V), dtype=dt)
        n = plan(call)["threads"]
        ts, th, tv0, tv1 = uniform_tasks(call.N, 1, call.HV, a.V, n)
        with launch(n):
            call_kernel(
                step_kernel,
                a.q, a.k, a.v, a.gate, a.beta, pool, rows, o, ts, th, tv0, tv1,
                a.n_sub, a.G, a.gate_kind, a.erase, a.beta_per_value, a.l2norm, a.scale,
            )  # fmt: skip
        return _finish_o(call, o)[:, 0], pool
    current = [np.asarray(p)[rows] for p in pools]
    if call.normalize:
        state = np.concatenate([current[0].astype(dt), current[1].astype(dt)[..., None]], -1)
    else:
        state = current[0].astype(dt)
    # The kernel reads and writes rows with a unit stride: C order, whatever the pool's.
    state = np.ascontiguousarray(state)
    seq_rows = np.arange(call.N, dtype=np.int64)
    final = np.empty(state.shape, dtype=dt)
    o = _recurrent(call, a, state, seq_rows, final, seq_rows, plan(call)["threads"])
    parts = _split_state(call, final)
    for p, new in zip(pools, parts if call.normalize else (parts,), strict=True):
        p[rows] = new
    return _finish_o(call, o)[:, 0], pool
