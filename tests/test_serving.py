"""Serving: multi-token calls into a state pool, state snapshots and rollback (issue 17).

Every op takes ``state_pool``/``state_indices`` (the pool's rows are the initial states and
receive the final states) and ``output_state_snapshots`` (the state after each token);
:func:`fastweights.rollback` restores a row to the state after the accepted tokens. Each is
checked against recomputing with ``initial_state`` on every op, on the reference and numba
backends, packed and not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastweights
from fastweights.backends import RULES, dims_of
from fastweights.testing import OPS, Call, random_call

BACKENDS = ("reference", "numba")
RTOL = 1e-9


def _backend(name: str) -> str:
    info = {b.name: b for b in fastweights.backends.list_backends()}
    if name not in info or not info[name].available:
        pytest.skip(f"{name} backend unavailable")
    return name


def _available() -> list[str]:
    info = {b.name: b for b in fastweights.backends.list_backends()}
    return [n for n in BACKENDS if n in info and info[n].available]


def _parts(state: Any) -> tuple[Any, ...]:
    return tuple(state) if isinstance(state, tuple | list) else (state,)


def _close(a: Any, b: Any) -> bool:
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=RTOL)
        for x, y in zip(_parts(a), _parts(b), strict=True)
    )


def _call(op: str, seed: int = 0, **kw: Any) -> Call:
    return random_call(op, seed=seed, heads=2, key_dim=5, value_dim=3, **kw)


def _tokens(call: Call, start: int, stop: int, row: int | None = None) -> dict[str, Any]:
    """The arrays of tokens ``start:stop`` (of batch row ``row``), without the state."""
    n = call.kwargs.get("num_householder", 1)
    out = {}
    for arg in RULES[call.op].arrays:
        x = call.arrays.get(arg.name)
        if x is None:
            continue
        dims = dims_of(arg.shape)
        if row is not None and dims[0] == "B":
            x = x[row : row + 1]
        if len(dims) > 1 and dims[1] in ("T", "R"):
            r = n if dims[1] == "R" and n > 1 else 1
            x = x[:, start * r : stop * r]
        out[arg.name] = x
    return out


def _run(call: Call, arrays: dict[str, Any], **extra: Any) -> Any:
    order = RULES[call.op].positional
    args = [arrays[name] for name in order]
    rest = {n: x for n, x in arrays.items() if n not in order}
    extra.setdefault("backend", "reference")  # the oracle; pool calls name their backend
    return getattr(fastweights, call.op)(*args, **rest, **call.kwargs, **extra)


def _row(state: Any, i: int) -> Any:
    parts = tuple(p[i : i + 1] for p in _parts(state))
    return parts if isinstance(state, tuple) else parts[0]


def _pool_with(initial: Any, indices: np.ndarray, rows: int, dtype: Any, rng: Any) -> Any:
    """A pool of ``rows`` random rows holding ``initial`` at ``indices``."""
    pools = []
    for part in _parts(initial):
        pool = (0.3 * rng.standard_normal((rows, *part.shape[1:]))).astype(dtype)
        if part.ndim == 4 and part.shape[-1] == part.shape[-2]:  # mesa's H: keep it PSD
            pool = np.abs(pool) * 0 + np.eye(part.shape[-1], dtype=dtype)
        pool[indices] = part
        pools.append(pool)
    return tuple(pools) if isinstance(initial, tuple) else pools[0]


def _sequences(call: Call) -> list[tuple[int | None, int, int]]:
    """(batch row, first token, length) of each sequence of the call."""
    cu = call.arrays.get("cu_seqlens")
    if cu is None:
        return [
            (b, 0, call.length) for b in range(call.arrays[RULES[call.op].arrays[0].name].shape[0])
        ]
    return [(0, int(cu[i]), int(cu[i + 1] - cu[i])) for i in range(len(cu) - 1)]


SEQLENS = (None, [3, 0, 2])


@pytest.mark.parametrize("seqlens", SEQLENS, ids=["batch", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_pool_call_is_a_call_from_its_rows(op: str, backend: str, seqlens: Any) -> None:
    """Row ``i`` starts from ``pool[idx[i]]`` and ends there; other rows stay; o agrees."""
    backend = _backend(backend)
    call = _call(op, batch=2, length=4, seqlens=seqlens)
    initial = call.arrays["initial_state"]
    arrays = {n: x for n, x in call.arrays.items() if n != "initial_state"}
    o_ref, final = _run(call, arrays, initial_state=initial, output_final_state=True)
    rng = np.random.default_rng(1)
    N = _parts(initial)[0].shape[0]
    idx = rng.permutation(N + 3)[:N]
    pool = _pool_with(initial, idx, N + 3, np.float64, rng)
    before = tuple(p.copy() for p in _parts(pool))
    o, out = _run(call, arrays, state_pool=pool, state_indices=idx, backend=backend)
    assert out is pool or all(a is b for a, b in zip(out, pool, strict=True))
    assert _close(o, o_ref)
    others = np.setdiff1d(np.arange(N + 3), idx)
    for p, b, f in zip(_parts(pool), before, _parts(final), strict=True):
        assert np.allclose(p[idx], f, rtol=RTOL, atol=RTOL)
        assert np.array_equal(p[others], b[others])


@pytest.mark.parametrize("seqlens", SEQLENS, ids=["batch", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_snapshots_are_the_states_of_the_prefixes(op: str, backend: str, seqlens: Any) -> None:
    """``snapshots[i, j]`` is the state after ``j`` tokens of sequence ``i``; rollback to
    ``accepted[i]`` equals recomputing the accepted prefix from the row's old state."""
    backend = _backend(backend)
    call = _call(op, seed=2, batch=2, length=3, seqlens=seqlens)
    initial = call.arrays["initial_state"]
    arrays = {n: x for n, x in call.arrays.items() if n != "initial_state"}
    o_ref, _ = _run(call, arrays, initial_state=initial)
    N = _parts(initial)[0].shape[0]
    idx = np.arange(N)[::-1] + 1
    rng = np.random.default_rng(3)
    pool = _pool_with(initial, idx, N + 1, np.float64, rng)
    o, pool_out, snaps = _run(
        call,
        arrays,
        state_pool=pool,
        state_indices=idx,
        output_state_snapshots=True,
        backend=backend,
    )
    assert _close(o, o_ref)
    seqs = _sequences(call)
    L = max(length for _, _, length in seqs)
    assert all(s.shape[:2] == (N, L + 1) for s in _parts(snaps))
    recomputed = []
    for i, (b, start, length) in enumerate(seqs):
        states = [_row(initial, i)]
        for j in range(1, length + 1):
            part = _tokens(call, start, start + j, row=b)
            part.pop("cu_seqlens", None)
            _, s = _run(call, part, initial_state=_row(initial, i), output_final_state=True)
            states.append(s)
        states += [states[-1]] * (L - length)  # a shorter sequence repeats its final state
        for j, s in enumerate(states):
            assert _close(tuple(x[i : i + 1, j] for x in _parts(snaps)), _parts(s)), (i, j)
        recomputed.append(states)
    accepted = np.array([rng.integers(0, length + 1) for _, _, length in seqs])
    out = fastweights.rollback(pool_out, snaps, idx, accepted)
    for i in range(N):
        want = _parts(recomputed[i][accepted[i]])
        for p, w in zip(_parts(out), want, strict=True):
            assert np.allclose(p[idx[i]], w[0], rtol=RTOL, atol=RTOL)


def test_snapshots_without_a_pool() -> None:
    """``output_state_snapshots`` alone: ``(o, final_state or None, snapshots)``."""
    call = _call("gated_delta_rule", batch=2, length=5, initial_state=False)
    arrays = dict(call.arrays)
    o, final, snaps = _run(call, arrays, output_state_snapshots=True)
    assert final is None and snaps.shape == (2, 6, 2, 5, 3)
    assert not np.any(snaps[:, 0])
    o2, final, snaps2 = _run(call, arrays, output_state_snapshots=True, output_final_state=True)
    assert np.array_equal(snaps2[:, -1], final) and _close(o, o2)


def test_float32_pool_keeps_its_dtype_and_odd_strides() -> None:
    """A float32 pool that is a strided view stays float32 and gets the float64 result."""
    call = _call("gla", batch=3, length=6)
    initial = call.arrays["initial_state"]
    arrays = {n: x for n, x in call.arrays.items() if n != "initial_state"}
    _, final = _run(call, arrays, initial_state=initial, output_final_state=True)
    base = np.zeros((10, 2, 5, 6), dtype=np.float32)
    pool = base[::2, :, :, ::2]  # [5, 2, 5, 3], every axis but one strided
    pool[[4, 0, 2]] = initial
    for backend in _available():
        p = np.zeros_like(base)[::2, :, :, ::2]  # a fresh strided view each time
        p[[4, 0, 2]] = initial
        _, out = _run(call, arrays, state_pool=p, state_indices=[4, 0, 2], backend=backend)
        assert out is p and p.dtype == np.float32
        np.testing.assert_allclose(p[[4, 0, 2]], final, rtol=2e-6, atol=2e-6)
        assert not np.any(p[[1, 3]])


def test_normalised_linear_attention_takes_a_pair_of_pools() -> None:
    call = _call("linear_attn", batch=2, length=4, normalize=True)
    initial = call.arrays["initial_state"]
    arrays = {n: x for n, x in call.arrays.items() if n != "initial_state"}
    o_ref, (S, z) = _run(call, arrays, initial_state=initial, output_final_state=True)
    pools = (np.zeros((3, 2, 5, 3)), np.zeros((3, 2, 5)))
    pools[0][[2, 0]], pools[1][[2, 0]] = initial
    o, out, (sS, sz) = _run(
        call, arrays, state_pool=pools, state_indices=[2, 0], output_state_snapshots=True
    )
    assert _close(o, o_ref) and _close(out[0][[2, 0]], S) and _close(out[1][[2, 0]], z)
    assert sS.shape == (2, 5, 2, 5, 3) and sz.shape == (2, 5, 2, 5)
    back = fastweights.rollback(out, (sS, sz), [2, 0], [0, 0])
    assert _close(back[0][[2, 0]], initial[0]) and _close(back[1][[2, 0]], initial[1])
    with pytest.raises(ValueError, match=r"state_pool\[0\] and state_pool\[1\] share memory"):
        flat = np.zeros(3 * 2 * 5 * 4)
        shared = (flat[:90].reshape(3, 2, 5, 3), flat[60:90].reshape(3, 2, 5))
        _run(call, arrays, state_pool=shared, state_indices=[2, 0])


def _gdr() -> tuple[Call, dict[str, Any]]:
    call = _call("gated_delta_rule", batch=2, length=3)
    return call, {n: x for n, x in call.arrays.items() if n != "initial_state"}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"initial_state": np.zeros((2, 2, 5, 3))}, "state_pool and initial_state"),
        ({"output_final_state": True}, "state_pool and initial_state/output_final_state"),
        ({"state_indices": [1, 1]}, "state_indices must be distinct"),
        ({"state_indices": [0, 4]}, r"state_indices must lie in \[0, P\)"),
        ({"state_indices": [0]}, r"state_indices must have shape \(N,\)"),
    ],
)
def test_pool_errors_name_the_argument(extra: dict[str, Any], match: str) -> None:
    call, arrays = _gdr()
    pool = np.zeros((4, 2, 5, 3))
    kw = {"state_indices": [0, 1], **extra}
    with pytest.raises(ValueError, match=match):
        _run(call, arrays, state_pool=pool, **kw)
    assert not np.any(pool)


def test_pool_is_checked_before_any_work() -> None:
    call, arrays = _gdr()
    pool = np.zeros((4, 2, 5, 3))
    pool.flags.writeable = False
    with pytest.raises(ValueError, match="state_pool is read-only"):
        _run(call, arrays, state_pool=pool, state_indices=[0, 1])
    with pytest.raises(TypeError, match=r"state_pool \(the state pool\) must be float32"):
        _run(call, arrays, state_pool=np.zeros((4, 2, 5, 3), np.float16), state_indices=[0, 1])
    with pytest.raises(ValueError, match=r"state_pool must have shape \[P, HV, K, V\]"):
        _run(call, arrays, state_pool=np.zeros((4, 2, 5, 4)), state_indices=[0, 1])
    with pytest.raises(ValueError, match="state_indices needs state_pool"):
        _run(call, arrays, state_indices=[0, 1])
    with pytest.raises(TypeError, match="output_state_snapshots must be a bool"):
        _run(call, arrays, output_state_snapshots=np.ones(2))


def test_rollback_errors() -> None:
    call, arrays = _gdr()
    pool = np.zeros((4, 2, 5, 3))
    _, pool, snaps = _run(
        call, arrays, state_pool=pool, state_indices=[3, 1], output_state_snapshots=True
    )
    saved = pool.copy()
    with pytest.raises(ValueError, match=r"accepted must lie in \[0, L\] = \[0, 3\]"):
        fastweights.rollback(pool, snaps, [3, 1], [4, 0])
    with pytest.raises(ValueError, match="accepted must have shape"):
        fastweights.rollback(pool, snaps, [3, 1], [1])
    with pytest.raises(ValueError, match="state_indices must be distinct"):
        fastweights.rollback(pool, snaps, [3, 3], [1, 1])
    with pytest.raises(ValueError, match=r"snapshots must have shape \[N, L \+ 1"):
        fastweights.rollback(pool, snaps[:, :, :, :2], [3, 1], [1, 1])
    with pytest.raises(TypeError, match="snapshots must be an array"):
        fastweights.rollback(pool, (snaps,), [3, 1], [1, 1])
    ro = pool.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="state_pool is read-only"):
        fastweights.rollback(ro, snaps, [3, 1], [1, 1])
    assert np.array_equal(pool, saved)


def test_jax_gets_a_new_pool() -> None:
    jnp = pytest.importorskip("jax.numpy")
    call, arrays = _gdr()
    jarrays = {n: jnp.asarray(x) for n, x in arrays.items()}
    pool = jnp.zeros((4, 2, 5, 3), dtype=jnp.float32)
    _, new, snaps = _run(
        call, jarrays, state_pool=pool, state_indices=[3, 1], output_state_snapshots=True
    )
    assert new is not pool and not bool(jnp.any(pool != 0)) and new.dtype == jnp.float32
    back = fastweights.rollback(new, snaps, [3, 1], [0, 3])
    assert not bool(jnp.any(back[3] != 0))
    np.testing.assert_allclose(np.asarray(back[1]), np.asarray(new[1]))


@given(
    op=st.sampled_from(OPS),
    seed=st.integers(0, 2**16),
    packed=st.booleans(),
    length=st.integers(1, 9),
    extra_rows=st.integers(0, 3),
)
def test_property_pool_call_equals_one_call(
    op: str, seed: int, packed: bool, length: int, extra_rows: int
) -> None:
    """A pool call (reference backend) gives ``o`` and states of the call with
    ``initial_state``, and its snapshots end at the final states."""
    rng = np.random.default_rng(seed)
    seqlens = list(rng.integers(0, length + 1, size=rng.integers(1, 4))) if packed else None
    call = _call(op, seed=seed, batch=int(rng.integers(1, 3)), length=length, seqlens=seqlens)
    initial = call.arrays["initial_state"]
    arrays = {n: x for n, x in call.arrays.items() if n != "initial_state"}
    o_ref, final = _run(
        call, arrays, initial_state=initial, output_final_state=True, backend="reference"
    )
    N = _parts(initial)[0].shape[0]
    idx = rng.permutation(N + extra_rows)[:N]
    pool = _pool_with(initial, idx, N + extra_rows, np.float64, rng)
    o, out, snaps = _run(
        call,
        arrays,
        state_pool=pool,
        state_indices=idx,
        output_state_snapshots=True,
        backend="reference",
    )
    assert _close(o, o_ref)
    assert _close(tuple(p[idx] for p in _parts(out)), final)
    assert _close(tuple(s[:, -1] for s in _parts(snaps)), final)


@pytest.mark.parametrize("seqlens", SEQLENS, ids=["batch", "packed"])
def test_snapshots_without_a_decoding_backend(
    monkeypatch: pytest.MonkeyPatch, seqlens: Any
) -> None:
    """A backend that does not decode the op runs each position as a one-token call."""
    from fastweights import _serving

    real = _serving.select

    def no_steps(call: Any, backend: Any) -> Any:
        if call.is_step:
            raise TypeError("no decoding here")
        return real(call, backend)

    call = _call("kda", seed=5, batch=2, length=3, seqlens=seqlens)
    arrays = {n: x for n, x in call.arrays.items() if n != "initial_state"}
    initial = call.arrays["initial_state"]
    pool = np.concatenate([initial, initial])
    idx = np.arange(len(initial), 2 * len(initial))
    stepped = _run(
        call, arrays, state_pool=pool.copy(), state_indices=idx, output_state_snapshots=True
    )
    monkeypatch.setattr(_serving, "select", no_steps)
    out = _run(call, arrays, state_pool=pool, state_indices=idx, output_state_snapshots=True)
    for a, b in zip(stepped, out, strict=True):
        assert _close(a, b)


def test_dask_pool_and_snapshots() -> None:
    da = pytest.importorskip("dask.array")
    call, arrays = _gdr()
    initial = call.arrays["initial_state"]
    _, final = _run(call, arrays, initial_state=initial, output_final_state=True)
    lazy = {n: da.from_array(x, chunks=(1, *x.shape[1:])) for n, x in arrays.items()}
    pool = da.from_array(np.concatenate([np.zeros_like(initial), initial]), chunks=-1)
    _, out, snaps = _run(
        call,
        lazy,
        state_pool=pool,
        state_indices=[2, 3],
        output_state_snapshots=True,
        backend=None,
    )
    assert _close(out.compute()[2:], final)
    back = fastweights.rollback(out, snaps, [2, 3], [0, 3]).compute()
    assert _close(back[2], initial[0]) and _close(back[3], final[1])
