"""Serving: multi-token calls into a decoding state pool, the state after each token, and
rolling a pool back to the state after each request's accepted tokens (speculative decoding).

Every sequence op takes ``state_pool`` and ``state_indices``: validation
(:func:`fastweights._validate.validate`) checks the pool as :mod:`fastweights.step` does and
gathers the rows ``state_indices`` as the call's ``initial_state``; :func:`run` runs the op on
any backend, in any form, and writes the final states back into those rows (in place, or into
a new pool for immutable namespaces such as JAX). ``output_state_snapshots=True`` runs the
call one token at a time (the recurrent form of the chosen backend, one call per token
position) and returns every state along the way; :func:`rollback` copies the state after
``accepted[i]`` tokens into request ``i``'s pool row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import array_api_compat
import numpy as np

from ._pool import write_rows
from ._registry import select
from ._validate import (
    Call,
    _check_indices,
    _check_pool_arrays,
    _namespace,
    to_host_ints,
)
from .rules._rule import dims_of


def run(call: Call, backend: str | None) -> tuple[Any, ...]:
    """Run a validated sequence call that has a pool or asks for snapshots.

    Returns ``(o, state)``, or ``(o, state, snapshots)`` with ``output_state_snapshots``;
    ``state`` is the pool (after the write-back) when the call has one, else the final state
    (None unless ``output_final_state``).
    """
    plain = dataclasses.replace(call, pool=None, pool_indices=None, snapshots=False)
    snapshots = None
    if call.snapshots:
        o, final, snapshots = _run_with_snapshots(plain, backend)
    else:
        o, final = select(plain, backend).run(plain)
    if call.pool is not None:
        pair = isinstance(call.pool, tuple | list)
        pools = tuple(call.pool) if pair else (call.pool,)
        finals = tuple(final) if pair else (final,)
        written = tuple(
            write_rows(call.xp, pool, call.pool_indices, new)
            for pool, new in zip(pools, finals, strict=True)
        )
        final = written if pair else written[0]
    elif not call.output_final_state:
        final = None
    return (o, final) if snapshots is None else (o, final, snapshots)


def _token_rows(call: Call) -> dict[str, int]:
    """The arrays of ``call`` with a token axis (axis 1), and their rows per token."""
    rows = {}
    for arg in call.spec.arrays:
        dims = dims_of(arg.shape)
        if len(dims) > 1 and dims[1] == "T":
            rows[arg.name] = 1
        elif len(dims) > 1 and dims[1] == "R":
            rows[arg.name] = call.num_householder
    return rows


def _arrays(call: Call) -> dict[str, Any]:
    named = {"q": call.q, "k": call.k, "v": call.v, **call.inputs}
    return {name: x for name, x in named.items() if x is not None}


def _with_arrays(call: Call, arrays: dict[str, Any], **fields: Any) -> Call:
    inputs = {name: arrays.get(name) for name in call.inputs}
    return dataclasses.replace(
        call,
        q=arrays.get("q"),
        k=arrays.get("k"),
        v=arrays.get("v"),
        inputs=inputs,
        output_final_state=True,
        form="recurrent",
        **fields,
    )


def _parts(state: Any) -> tuple[Any, ...]:
    return tuple(state) if isinstance(state, tuple | list) else (state,)


def _initial_parts(call: Call, backend: str | None) -> tuple[Any, ...]:
    """The state before the first token, in the compute dtype: ``initial_state``, or what the
    op starts from without one (zeros; ``srwm``: ``W0``), from a call with no tokens."""
    xp = call.xp
    if call.initial_state is not None:
        return tuple(xp.astype(p, call.dtype) for p in _parts(call.initial_state))
    rows = _token_rows(call)
    arrays = {}
    for name, x in _arrays(call).items():
        if name in rows:
            x = x[:1, :0, ...]
        elif dims_of(call.spec.arrays[_index(call, name)].shape)[0] == "B":
            x = x[:1, ...]
        arrays[name] = x
    empty = _with_arrays(
        call,
        arrays,
        B=1,
        T=0,
        cu_seqlens=np.zeros(call.N + 1, dtype=np.int64),
        initial_state=None,
    )
    _, final = select(empty, backend).run(empty)
    return tuple(xp.astype(p, call.dtype) for p in _parts(final))


def _index(call: Call, name: str) -> int:
    return [a.name for a in call.spec.arrays].index(name)


def _run_with_snapshots(call: Call, backend: str | None) -> tuple[Any, Any, Any]:
    """``(o, final_state, snapshots)``: the op one token position at a time.

    Token position ``j`` of every sequence that has one (packed sequences end at different
    positions) runs as one decoding step of the chosen backend (:mod:`fastweights.step`'s
    kernels) on a private pool of the ``N`` states in the compute dtype, copied after each
    position; a backend that does not decode the op runs each position as a one-token
    sequence call instead.
    """
    xp, dev = call.xp, call.device
    pair = len(call.spec.state_layout(normalize=call.normalize)) > 1
    rows = _token_rows(call)
    arrays = _arrays(call)
    cu = call.cu_seqlens
    N = call.N
    lengths = np.diff(cu) if cu is not None else np.full(N, call.T, dtype=np.int64)
    L = int(lengths.max()) if N else 0
    if L == 0:
        o, final = select(call, backend).run(
            dataclasses.replace(call, output_final_state=True, form="recurrent")
        )
        parts = tuple(xp.astype(p, call.dtype) for p in _parts(final))
        snaps = tuple(xp.stack([p], axis=1) for p in parts)
        return o, (parts if pair else parts[0]), (snaps if pair else snaps[0])
    state = _initial_parts(call, backend)
    pool = tuple(xp.asarray(p, copy=True) for p in state)  # private, writeable
    history = [state]
    outputs, positions = [], []
    for j in range(L):
        active = np.flatnonzero(lengths > j)
        M = int(active.size)
        if cu is None:
            sliced = {
                name: x[:, j * rows[name] : (j + 1) * rows[name], ...] if name in rows else x
                for name, x in arrays.items()
            }
        else:
            pos = cu[:-1][active] + j
            positions.append(pos)
            sliced = {}
            for name, x in arrays.items():
                if name in rows:  # token pos[m] of sequence m as batch row m, one token
                    r = rows[name]
                    at = xp.asarray((pos[:, None] * r + np.arange(r)).reshape(-1), device=dev)
                    x = xp.take(x, at, axis=1)
                    x = xp.reshape(x, (M, r, *x.shape[2:]))
                elif dims_of(call.spec.arrays[_index(call, name)].shape)[0] == "B":
                    x = xp.take(x, xp.asarray(np.zeros(M, dtype=np.int64), device=dev), axis=0)
                sliced[name] = x
        idx = None if M == N else active
        o, pool = _one_position(call, sliced, pool, idx, M, backend)
        outputs.append(o)
        history.append(tuple(xp.asarray(p, copy=True) for p in pool))
    if cu is None:
        o = xp.stack(outputs, axis=1)
    else:  # back to the packed order of the tokens: [1, T, HV, V]
        order = np.argsort(np.concatenate(positions), kind="stable")
        o = xp.take(xp.concat(outputs, axis=0), xp.asarray(order, device=dev), axis=0)[None]
    final = history[-1]
    snaps = tuple(xp.stack([s[i] for s in history], axis=1) for i in range(len(final)))
    return o, (final if pair else final[0]), (snaps if pair else snaps[0])


def _one_position(
    call: Call,
    arrays: dict[str, Any],
    pool: tuple[Any, ...],
    idx: np.ndarray | None,
    M: int,
    backend: str | None,
) -> tuple[Any, tuple[Any, ...]]:
    """One token of ``M`` sequences (rows ``idx`` of ``pool``, None: all): ``o: [M, HV, V]``
    and the pool after it (the same arrays where updated in place)."""
    pair = len(pool) > 1
    step = _with_arrays(
        call,
        arrays,
        B=M,
        T=1,
        N=M,
        cu_seqlens=None,
        initial_state=None,
        state_pool=pool if pair else pool[0],
        state_indices=idx,
    )
    try:
        runner = select(step, backend)
    except TypeError:  # the backend does not decode this op: a one-token sequence call
        runner = None
    if runner is not None:
        o, new = runner.step(step)
        return o, _parts(new)
    xp = call.xp
    chosen = None if idx is None else xp.asarray(idx, device=call.device)
    start = pool if chosen is None else tuple(xp.take(p, chosen, axis=0) for p in pool)
    sub = dataclasses.replace(
        step, state_pool=None, state_indices=None, initial_state=start if pair else start[0]
    )
    o, final = select(sub, backend).run(sub)
    finals = tuple(xp.astype(f, p.dtype) for f, p in zip(_parts(final), pool, strict=True))
    if chosen is None:
        return o[:, 0, ...], finals
    where = np.arange(pool[0].shape[0])
    where[idx] = pool[0].shape[0] + np.arange(M)
    at = xp.asarray(where, device=call.device)
    merged = tuple(
        xp.take(xp.concat([p, f], axis=0), at, axis=0) for p, f in zip(pool, finals, strict=True)
    )
    return o[:, 0, ...], merged


def rollback(state_pool: Any, snapshots: Any, state_indices: Any, accepted: Any) -> Any:
    """Set each request's pool row to its state after its accepted tokens.

    The commit step of speculative decoding: a verify call
    ``op(..., state_pool=pool, state_indices=rows, output_state_snapshots=True)`` wrote the
    state after all its tokens into the pool and returned ``snapshots``, whose entry ``[i, j]``
    is request ``i``'s state after ``j`` of the call's tokens (``j = 0``: before the call).
    ``rollback`` writes ``snapshots[i, accepted[i]]`` into ``state_pool[state_indices[i]]``.

    Parameters
    ----------
    state_pool : array or tuple of arrays
        The pool ``[P, HV, K, V]`` (a tuple of pools for a pair state such as
        ``linear_attn(normalize=True)``'s ``(S, z)``), float32 or float64 (its dtype is
        kept). Updated in place where the namespace allows it; a read-only pool raises
        ``ValueError`` before anything is written.
    snapshots : array or tuple of arrays
        ``[N, L + 1, HV, K, V]`` (one per part of the state), as returned by a call with
        ``output_state_snapshots=True``.
    state_indices : integer array-like or None
        ``[N]`` distinct pool rows of the requests, as given to that call; None means
        ``arange(N)`` (then ``P == N``).
    accepted : integer array-like
        ``[N]``, the number of tokens of the call each request keeps, ``0 <= accepted[i] <=
        L``; ``0`` restores the state before the call.

    Returns
    -------
    state_pool : array or tuple of arrays
        The pool: the same object, updated in place (NumPy, CuPy, torch), or a new array
        (JAX, whose arrays are immutable).

    Examples
    --------
    Verify three draft tokens of two requests, then keep 2 of request 0's and none of
    request 1's:

    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> pool = rng.standard_normal((4, 2, 8, 8))
    >>> before = pool.copy()
    >>> q, k, v = (rng.standard_normal((2, 3, 2, 8)) for _ in range(3))
    >>> beta = rng.random((2, 3, 2))
    >>> o, pool, snaps = fastweights.delta_rule(q, k, v, beta, state_pool=pool,
    ...                                         state_indices=[3, 1], output_state_snapshots=True)
    >>> snaps.shape  # [N, T + 1, HV, K, V]
    (2, 4, 2, 8, 8)
    >>> pool = fastweights.rollback(pool, snaps, [3, 1], accepted=[2, 0])
    >>> _, S2 = fastweights.delta_rule(q[:1, :2], k[:1, :2], v[:1, :2], beta[:1, :2],
    ...                                initial_state=before[3:4], output_final_state=True)
    >>> bool(np.allclose(pool[3], S2[0])), bool(np.array_equal(pool[1], before[1]))
    (True, True)
    """
    pair = isinstance(state_pool, tuple | list)
    if isinstance(snapshots, tuple | list) != pair:
        want = "a tuple of arrays, one per pool" if pair else "an array"
        raise TypeError(f"snapshots must be {want}, like state_pool")
    pools = tuple(state_pool) if pair else (state_pool,)
    snaps = tuple(snapshots) if pair else (snapshots,)
    if len(snaps) != len(pools):
        raise ValueError(
            f"snapshots must have one array per part of state_pool ({len(pools)}), got {len(snaps)}"
        )
    if not pools:
        raise ValueError("state_pool must not be an empty tuple")
    label = (lambda base, i: f"{base}[{i}]") if pair else (lambda base, i: base)
    xp = _namespace(label("state_pool", 0), pools[0])
    for i, (pool, snap) in enumerate(zip(pools, snaps, strict=True)):
        for name, x in ((label("state_pool", i), pool), (label("snapshots", i), snap)):
            if _namespace(name, x) is not xp:
                raise TypeError(f"{name} is not an array of the namespace of state_pool")
        if snap.ndim != pool.ndim + 1 or tuple(snap.shape[2:]) != tuple(pool.shape[1:]):
            raise ValueError(
                f"{label('snapshots', i)} must have shape [N, L + 1, *{label('state_pool', i)}"
                f".shape[1:]] = [N, L + 1, {', '.join(map(str, pool.shape[1:]))}], got "
                f"{tuple(snap.shape)}"
            )
        if snap.shape[:2] != snaps[0].shape[:2] or pool.shape[0] != pools[0].shape[0]:
            raise ValueError("the parts of state_pool and snapshots must agree on P, N and L")
    N, steps = int(snaps[0].shape[0]), int(snaps[0].shape[1])
    _check_pool_arrays({label("state_pool", i): p for i, p in enumerate(pools)}, xp)
    idx = _check_indices(state_indices, N, int(pools[0].shape[0]))
    keep = to_host_ints("accepted", accepted, ValueError)
    if keep.shape != (N,):
        raise ValueError(f"accepted must have shape (N,) = ({N},), got {keep.shape}")
    if keep.size and (keep.min() < 0 or keep.max() >= steps):
        raise ValueError(
            f"accepted must lie in [0, L] = [0, {steps - 1}] (the call's tokens), got values "
            f"from {keep.min()} to {keep.max()}"
        )
    at = np.arange(N, dtype=np.int64) * steps + keep
    where = xp.asarray(at, device=array_api_compat.device(pools[0]))
    written = []
    for pool, snap in zip(pools, snaps, strict=True):
        flat = xp.reshape(snap, (N * steps, *snap.shape[2:]))
        written.append(write_rows(xp, pool, idx, xp.take(flat, where, axis=0)))
    return tuple(written) if pair else written[0]


__all__ = ["rollback", "run"]
