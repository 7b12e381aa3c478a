"""The numba recurrent and step kernels on legal but unusual inputs (issue 11).

Every pool, initial-state and input layout (C and Fortran order, transposed views, negative
strides, broadcast states, a strided last axis) gives the float64 reference's answer and
writes only correct values; the running decay never overflows where the plain recurrence is
finite; a ``-inf`` gate resets the state (or a key row) to exactly zero even from NaN, and a
non-finite input changes no earlier output; read-only pools are refused before any write.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastweights
from fastweights.testing import assert_close, random_call, run_steps

numba = pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def _quiet_python_kernels() -> Iterator[None]:
    """With ``NUMBA_DISABLE_JIT=1`` the kernels run on NumPy scalars, which warn on the NaN,
    Inf and overflow these tests feed them (compiled kernels follow IEEE silently)."""
    if getattr(numba.config, "DISABLE_JIT", False):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            yield
    else:
        yield


BACKEND = "numba"
OPS = (
    "linear_attn",
    "simple_gla",
    "gla",
    "delta_rule",
    "gated_delta_rule",
    "kda",
    "delta_product",
)
DECAYED = ("simple_gla", "gla", "gated_delta_rule", "kda", "delta_product")
PER_ROW = ("gla", "kda")
LAYOUTS = ("C", "F", "transposed", "reversed_last", "reversed_first", "strided_last")
ODD = (1, 2, 15, 17)


def relayout(x: np.ndarray, kind: str) -> np.ndarray:
    """``x``'s values in the memory layout ``kind`` (a fresh array or a view of one)."""
    x = np.asarray(x)
    if kind == "C":
        return np.ascontiguousarray(x)
    if kind == "F":
        return np.asfortranarray(x)
    if kind == "transposed":  # the last two axes stored swapped: [.., V, K] viewed as [.., K, V]
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if kind == "reversed_last":
        return np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    if kind == "reversed_first":
        return np.ascontiguousarray(x[::-1])[::-1]
    if kind == "strided_last":
        buf = np.full((*x.shape[:-1], 2 * x.shape[-1]), np.nan, dtype=x.dtype)
        buf[..., ::2] = x
        return buf[..., ::2]
    raise AssertionError(kind)


def _call(op: str, seed: int, **kw: Any) -> Any:
    extra = {"normalize": kw.pop("normalize", False)} if op == "linear_attn" else {}
    return random_call(op, seed=seed, **kw, **extra)


def _pool(call: Any, P: int, seed: int, dt: Any) -> Any:
    """A random pool of ``P`` rows for ``call`` (the ``(S, z)`` pair when normalised)."""
    rng = np.random.default_rng(seed)
    S0 = call.arrays["initial_state"]
    if isinstance(S0, tuple):
        S = rng.standard_normal((P, *S0[0].shape[1:])).astype(dt)
        z = np.abs(rng.standard_normal((P, *S0[1].shape[1:]))).astype(dt) + 1
        return S, z
    return rng.standard_normal((P, *S0.shape[1:])).astype(dt)


def _map(state: Any, f: Any) -> Any:
    return tuple(f(s) for s in state) if isinstance(state, tuple) else f(state)


def _parts(state: Any) -> tuple[Any, ...]:
    return tuple(state) if isinstance(state, tuple) else (state,)


@given(
    op=st.sampled_from(OPS),
    normalize=st.booleans(),
    layout=st.sampled_from(LAYOUTS[1:]),
    dtype=st.sampled_from(["float32", "float64"]),
    key_dim=st.sampled_from(ODD),
    value_dim=st.sampled_from((*ODD, 65)),
    seed=st.integers(0, 2**16),
)
def test_step_any_pool_layout(
    op: str, normalize: bool, layout: str, dtype: str, key_dim: int, value_dim: int, seed: int
) -> None:
    """Decoding into a pool of any layout: the reference's outputs and states, other rows
    untouched (the old fallback kept a strided last axis that the kernel read as unit-stride
    and wrote uninitialised values into the pool)."""
    dt = np.dtype(dtype)
    call = _call(
        op, seed, batch=2, length=3, key_dim=key_dim, value_dim=value_dim,
        normalize=normalize and op == "linear_attn",
    )  # fmt: skip
    rows = np.array([3, 1])
    start = _pool(call, 4, seed, dt)
    want = run_steps(call, _map(start, lambda s: s.astype(np.float64)), state_indices=rows,
                     backend="reference")  # fmt: skip
    pool = _map(start, lambda s: relayout(s, layout))
    got = run_steps(call.cast(dt), pool, state_indices=rows, backend=BACKEND)
    assert got.in_place
    assert_close(got.o, want.o, dtype=dt, form="recurrent", name="o")
    for g, w, s in zip(_parts(got.state), _parts(want.state), _parts(start), strict=True):
        assert_close(g[rows], w[rows], dtype=dt, form="recurrent", name="state")
        np.testing.assert_array_equal(g[[0, 2]], s[[0, 2]])


@given(
    op=st.sampled_from(OPS),
    normalize=st.booleans(),
    state_layout=st.sampled_from((*LAYOUTS, "broadcast")),
    input_layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(["float32", "float64"]),
    length=st.sampled_from(ODD),
    key_dim=st.sampled_from(ODD),
    value_dim=st.sampled_from((*ODD, 65)),
    seed=st.integers(0, 2**16),
)
def test_sequence_any_state_and_input_layout(
    op: str,
    normalize: bool,
    state_layout: str,
    input_layout: str,
    dtype: str,
    length: int,
    key_dim: int,
    value_dim: int,
    seed: int,
) -> None:
    """The recurrent form with initial states and inputs of any layout (a Fortran-ordered
    ``(S, z)`` pair gave a relative error of 0.8)."""
    dt = np.dtype(dtype)
    call = _call(
        op, seed, batch=2, length=length, key_dim=key_dim, value_dim=value_dim,
        normalize=normalize and op == "linear_attn",
    )  # fmt: skip
    if state_layout == "broadcast":
        init = _map(call.arrays["initial_state"], lambda s: np.broadcast_to(s[:1], s.shape))
    else:
        init = _map(call.arrays["initial_state"], lambda s: relayout(s, state_layout))
    arrays = {**call.arrays, "initial_state": _map(init, np.ascontiguousarray)}
    want = type(call)(call.op, arrays, call.kwargs).expected()
    cast = call.cast(dt)
    moved = {
        n: (x if n == "initial_state" or x is None else relayout(x, input_layout))
        for n, x in cast.arrays.items()
    }
    moved["initial_state"] = _map(init, lambda s: s.astype(dt, copy=False))
    snapshot = {n: _map(x, np.copy) for n, x in moved.items() if x is not None}
    got = type(call)(call.op, moved, call.kwargs).run(
        getattr(fastweights, op), backend=BACKEND, form="recurrent", output_final_state=True
    )
    assert_close(got[0], want[0], dtype=dt, form="recurrent", name="o")
    for g, w in zip(_parts(got[1]), _parts(want[1]), strict=True):
        assert_close(g, w, dtype=dt, form="recurrent", name="state")
    for n, x in snapshot.items():  # the caller's arrays are not modified
        for a, b in zip(_parts(moved[n]), _parts(x), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["F", "transposed", "reversed_last", "broadcast"])
def test_normalized_linear_attn_state_layouts(layout: str, dtype: str) -> None:
    """``linear_attn(normalize=True)`` from an ``(S, z)`` pair of any layout (a Fortran-ordered,
    transposed or broadcast pair gave a relative error of 0.8)."""
    dt = np.dtype(dtype)
    call = random_call("linear_attn", seed=3, batch=3, length=17, key_dim=15, value_dim=65,
                       normalize=True)  # fmt: skip
    S, z = call.arrays["initial_state"]
    if layout == "broadcast":
        S, z = np.broadcast_to(S[:1], S.shape), np.broadcast_to(z[:1], z.shape)
    else:
        S, z = relayout(S, layout), relayout(z, layout)
    want = type(call)(call.op, {**call.arrays, "initial_state": (S.copy(), z.copy())},
                      call.kwargs).expected()  # fmt: skip
    cast = call.cast(dt)
    got = type(call)(call.op, {**cast.arrays, "initial_state": (S.astype(dt), z.astype(dt))},
                     call.kwargs).run(fastweights.linear_attn, backend=BACKEND,
                                      form="recurrent", output_final_state=True)  # fmt: skip
    assert_close(got[0], want[0], dtype=dt, form="recurrent", name="o")
    for g, w in zip(got[1], want[1], strict=True):
        assert_close(g, w, dtype=dt, form="recurrent", name="state")


def _gate_args(op: str, g: np.ndarray, K: int, beta: np.ndarray) -> dict[str, np.ndarray]:
    if op in PER_ROW:
        gk = np.repeat(g[..., None], K, axis=-1)
        return {"gk": gk, "beta": beta} if op == "kda" else {"gk": gk}
    if op == "simple_gla":
        return {"g": g}
    return {"g": g, "beta": beta}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule", "kda"])
def test_running_decay_does_not_overflow(op: str, dtype: str) -> None:
    """A tiny decay (2e-18) followed by a state near the dtype's range: the plain recurrence
    is finite, the state kept as ``S / c`` was not (float32 ``simple_gla`` gave inf)."""
    dt = np.dtype(dtype)
    big = float(np.finfo(dt).max) * 1e-3 / 4  # |S| after the write; well inside the range
    B, T, H, K, V = 1, 4, 2, 5, 3
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V))
    v[:, 1:] *= big
    g = np.zeros((B, T, H))
    g[:, 0] = np.log(2e-18)
    args = {"q": q, "k": k, "v": v, **_gate_args(op, g, K, np.full((B, T, H), 0.5))}
    fn = getattr(fastweights, op)
    want = fn(**args, scale=1e-3, output_final_state=True, backend="reference")
    assert np.isfinite(want[0]).all() and np.isfinite(want[1]).all()
    cast = {n: x.astype(dt) for n, x in args.items()}
    got = fn(**cast, scale=1e-3, output_final_state=True, backend=BACKEND, form="recurrent")
    # Compared scaled down: the relative RMS error of values near the range would overflow.
    for x, w, name in ((got[0], want[0], "o"), (got[1], want[1], "state")):
        assert np.isfinite(x).all()
        assert_close(x.astype(np.float64) / big, w / big, dtype=dt, form="recurrent", name=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reset_at", [0, 1, 16, 18])
@pytest.mark.parametrize("op", DECAYED)
def test_hard_reset_clears_nan_state(op: str, reset_at: int, dtype: str) -> None:
    """A ``-inf`` gate sets the state to exactly zero, even from a NaN state (``exp(-inf) *
    NaN`` is NaN): the outputs from the reset on are those of a zero state. For per-key-row
    gates only the NaN row is reset."""
    dt = np.dtype(dtype)
    call = random_call(op, seed=reset_at, batch=2, length=20, key_dim=9, value_dim=70)
    arrays = dict(call.arrays)
    S = arrays["initial_state"].copy()
    name = "gk" if op in PER_ROW else "g"
    gate = arrays[name].copy()
    if op == "gla" or (op == "kda" and reset_at == 0):
        # One key row of every head (a delta-rule read before the reset would spread it).
        S[:, :, 3] = np.nan
        gate[:, reset_at, :, 3] = -np.inf
        clean = S.copy()
        clean[:, :, 3] = 0.0
    else:
        S[:] = np.nan
        gate[:, reset_at] = -np.inf
        clean = np.zeros_like(S)
    arrays[name] = gate
    want = type(call)(op, {**arrays, "initial_state": clean}, call.kwargs).expected()
    nan_call = type(call)(op, {**arrays, "initial_state": S}, call.kwargs).cast(dt)
    o, final = nan_call.run(
        getattr(fastweights, op), backend=BACKEND, form="recurrent", output_final_state=True
    )
    assert np.isnan(o[:, :reset_at]).all(axis=(1, 3)).all()
    assert_close(o[:, reset_at:], want[0][:, reset_at:], dtype=dt, form="recurrent", name="o")
    assert_close(final, want[1], dtype=dt, form="recurrent", name="state")
    # The same token by token into a NaN pool.
    if op == "delta_product" or reset_at > 1:
        return
    steps = type(call)(op, {n: x[:, : reset_at + 1] for n, x in nan_call.arrays.items()
                            if n != "initial_state"}, call.kwargs)  # fmt: skip
    pool = S.astype(dt)
    dec = run_steps(steps, pool, backend=BACKEND)
    assert_close(dec.o[:, reset_at:], want[0][:, reset_at : reset_at + 1], dtype=dt,
                 form="recurrent", name="step o")  # fmt: skip


@pytest.mark.parametrize("where", ["v", "k", "q", "gate"])
@pytest.mark.parametrize("op", OPS)
def test_non_finite_input_is_causal(op: str, where: str) -> None:
    """A NaN or Inf at token ``t`` changes no output before ``t`` (recurrent form)."""
    call = random_call(op, seed=5, batch=1, length=40, key_dim=7, value_dim=66)
    name = {"gate": "gk" if op in PER_ROW else "g"}.get(where, where)
    if name not in call.arrays or call.arrays[name] is None:
        pytest.skip(f"{op} has no {name}")
    want = call.run(getattr(fastweights, op), backend=BACKEND, form="recurrent")[0]
    for t, bad in ((33, np.nan), (17, np.inf), (39, -np.inf)):
        if name in ("g", "gk") and not np.isnan(bad):
            continue  # +inf is refused (g <= 0), -inf is a hard reset (tested above)
        x = call.arrays[name].copy()
        n = call.kwargs.get("num_householder", 1) if op == "delta_product" else 1
        rows = slice(t * n, t * n + 1) if name in ("k", "v") else slice(t, t + 1)
        x[:, rows] = bad
        poisoned = type(call)(op, {**call.arrays, name: x}, call.kwargs)
        o = poisoned.run(getattr(fastweights, op), backend=BACKEND, form="recurrent")[0]
        np.testing.assert_array_equal(o[:, :t], want[:, :t])


@pytest.mark.parametrize("half", ["S", "z", "both"])
def test_read_only_pool_is_refused_before_any_write(half: str) -> None:
    """A read-only pool (or half of the ``(S, z)`` pair) raises ``ValueError`` naming
    ``state`` and nothing is written (the copy path wrote ``S``, then failed on ``z``)."""
    call = random_call("linear_attn", seed=0, batch=2, length=1, normalize=True)
    S, z = (np.array(x) for x in call.arrays["initial_state"])
    before = S.copy(), z.copy()
    if half in ("S", "both"):
        S.flags.writeable = False
    if half in ("z", "both"):
        z.flags.writeable = False
    with pytest.raises(ValueError, match="state"):
        run_steps(call, (S, z), backend=BACKEND)
    np.testing.assert_array_equal(S, before[0])
    np.testing.assert_array_equal(z, before[1])


@pytest.mark.parametrize("kind", ["flag", "frombuffer"])
def test_read_only_single_pool(kind: str) -> None:
    call = random_call("gated_delta_rule", seed=0, batch=2, length=1)
    S0 = np.ascontiguousarray(call.arrays["initial_state"])
    if kind == "frombuffer":
        raw = S0.tobytes()
        pool = np.frombuffer(raw, dtype=S0.dtype).reshape(S0.shape)
    else:
        pool = S0.copy()
        pool.flags.writeable = False
    with pytest.raises(ValueError, match="state"):
        run_steps(call, pool, backend=BACKEND)
    np.testing.assert_array_equal(pool, S0)


@pytest.mark.parametrize("op", ["linear_attn", "gated_delta_rule", "kda"])
def test_step_inputs_that_view_the_pool(op: str) -> None:
    """``q``, ``k``, ``v`` (and gates) viewing pool rows that the step updates are read before
    it writes, as if copied first (one head's task read another head's updated row)."""
    rng = np.random.default_rng(1)
    N, H, K, V = 2, 4, 8, 70
    pool = rng.standard_normal((N, H, K, V))
    flip = pool[:, ::-1]
    args = {"q": flip[:, :, 0, :K], "k": flip[:, :, 1, 10 : 10 + K], "v": flip[:, :, 2, :]}
    if op == "kda":
        args["gk"] = -np.abs(flip[:, :, 3, :K])
        args["beta"] = np.full((N, H), 0.5)
    elif op == "gated_delta_rule":
        args["g"] = -np.abs(flip[:, :, 3, 0])
        args["beta"] = np.full((N, H), 0.5)
    want_pool = pool.copy()
    fn = getattr(fastweights.step, op)
    want, _ = fn(**{n: x.copy() for n, x in args.items()}, state=want_pool, backend="reference")
    got, _ = fn(**args, state=pool, backend=BACKEND)
    assert_close(got, want, dtype="float64", form="recurrent", name="o")
    assert_close(pool, want_pool, dtype="float64", form="recurrent", name="state")
