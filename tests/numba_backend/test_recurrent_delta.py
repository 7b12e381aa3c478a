"""The numba backend's Recurrent DeltaNet kernels (``backends/numba/recurrent_delta.py``): the
recurrent form and the decoding step against the float64 oracle
``fastweights.testing.naive.recurrent_delta_rule`` and, through the public API, against the
reference backend.

Shapes cover partial and full value blocks (V = 1, 2, 15, 17, 63, 65), odd key sizes, T in
(1, 2, 15, 17, 63, 65), packed sequences with empty ones, initial and final states, inputs of
any layout and byte order, steps on pools of any layout, read-only inputs. The kernel is
compiled once per dtype (one signature of layout ``'A'``), so the cases cost little beyond the
first call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")

from fastweights.backends.numba import recurrent_delta as kernels
from fastweights.testing import assert_close, naive

# Under NUMBA_DISABLE_JIT=1 (the coverage run) the kernels are Python, and NumPy scalars warn on
# the NaN the non-finite test feeds them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NAMES = ("q", "k", "v", "beta", "R_q", "R_k", "R_v", "r_beta")


def _inputs(seed: int, B: int, T: int, H: int, K: int, V: int, dtype: Any = np.float64) -> dict:
    """A problem whose slow net neither saturates nor vanishes: recurrent weights of scale
    ``1 / sqrt(V)``, ``h = tanh(o)`` of order one."""
    rng = np.random.default_rng(seed)
    r = 1.0 / np.sqrt(V)
    out = {
        "q": 2.0 * rng.standard_normal((B, T, H, K)),
        "k": 2.0 * rng.standard_normal((B, T, H, K)),
        "v": rng.standard_normal((B, T, H, V)),
        "beta": rng.standard_normal((B, T, H)),
        "R_q": r * rng.standard_normal((H, K, V)),
        "R_k": r * rng.standard_normal((H, K, V)),
        "R_v": r * rng.standard_normal((H, V, V)),
        "r_beta": r * rng.standard_normal((H, V)),
    }
    return {n: x.astype(dtype) for n, x in out.items()}


def _state(seed: int, N: int, H: int, K: int, V: int, dtype: Any = np.float64) -> tuple:
    rng = np.random.default_rng(seed)
    return (
        (0.5 * rng.standard_normal((N, H, K, V))).astype(dtype),
        rng.standard_normal((N, H, V)).astype(dtype),
    )


def _call(
    x: dict[str, Any],
    *,
    scale: float = 1.0,
    initial_state: Any = None,
    cu_seqlens: Any = None,
    final: bool = True,
    dtype: Any = None,
    pool: Any = None,
    state_indices: Any = None,
) -> SimpleNamespace:
    """The fields of a validated ``recurrent_delta_rule`` call that the kernels read."""
    B, T, H, K = x["q"].shape
    V = x["v"].shape[3]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if dtype is None:
        dtype = np.result_type(*(y.dtype for y in x.values()), np.float32)
    return SimpleNamespace(
        op="recurrent_delta_rule",
        xp=np,
        device="cpu",
        **x,
        initial_state=initial_state,
        scale=scale,
        use_qk_l2norm=False,
        output_final_state=final,
        cu_seqlens=None if cu_seqlens is None else np.asarray(cu_seqlens, np.int64),
        form="recurrent",
        chunk_size=64,
        normalize=False,
        num_householder=1,
        is_step=pool is not None,
        dtype=np.dtype(dtype),
        B=B,
        T=T,
        H=H,
        HV=H,
        K=K,
        V=V,
        N=N,
        state_pool=pool,
        state_indices=None if state_indices is None else np.asarray(state_indices, np.int64),
    )


def _oracle(call: SimpleNamespace) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    args = [np.asarray(getattr(call, n), np.float64) for n in NAMES]
    init = call.initial_state
    if init is not None:
        init = tuple(np.asarray(s, np.float64) for s in init)
    o, final = naive.recurrent_delta_rule(
        *args,
        scale=call.scale,
        initial_state=init,
        output_final_state=True,
        cu_seqlens=call.cu_seqlens,
    )
    return o, final


def _close(got: Any, want: Any, dtype: Any, name: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    if np.dtype(dtype) == np.float64:
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
        err = float(np.max(np.abs(got - want), initial=0.0)) / scale
        assert err <= 1e-10, f"{name}: max error {err:.2e} relative to max |{name}|"
    else:
        assert_close(got, want, dtype="float32", form="recurrent", name=name)


def _close_all(got: Any, want: Any, dtype: Any) -> None:
    o, final = got
    want_o, (want_S, want_last) = want
    _close(o, want_o, dtype, "o")
    _close(final[0], want_S, dtype, "S")
    _close(final[1], want_last, dtype, "o_last")


# ----------------------------------------------------------------------- the sequence kernel

SHAPES = [
    # B, T, H, K, V
    pytest.param(2, 1, 2, 1, 1, id="T1-K1-V1"),
    pytest.param(1, 2, 1, 2, 2, id="T2-K2-V2"),
    pytest.param(2, 15, 2, 15, 17, id="T15-K15-V17"),
    pytest.param(1, 17, 3, 17, 15, id="T17-K17-V15"),
    pytest.param(1, 63, 1, 65, 63, id="T63-K65-V63"),
    pytest.param(1, 65, 2, 63, 65, id="T65-K63-V65"),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("B", "T", "H", "K", "V"), SHAPES)
def test_matches_oracle(B: int, T: int, H: int, K: int, V: int, dtype: str) -> None:
    seed = T * 7 + K
    x = _inputs(seed, B, T, H, K, V, dtype)
    init = _state(seed + 1, B, H, K, V, dtype) if T % 2 else None
    call = _call(x, initial_state=init, scale=0.5 if T % 3 else 1.0)
    o, final = kernels.run(call)
    assert o.dtype == np.dtype(dtype) and o.shape == (B, T, H, V)
    assert all(s.dtype == np.dtype(dtype) for s in final)
    _close_all((o, final), _oracle(call), dtype)
    # o_last is the last output
    np.testing.assert_array_equal(final[1], o[:, -1])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_packed_sequences_with_empty_ones(dtype: str) -> None:
    cu = [0, 0, 9, 9, 40, 41]
    x = _inputs(3, 1, 41, 2, 11, 70, dtype)
    init = _state(4, 5, 2, 11, 70, dtype)
    call = _call(x, initial_state=init, cu_seqlens=cu)
    o, final = kernels.run(call)
    _close_all((o, final), _oracle(call), dtype)
    for s in (0, 2):  # the empty sequences keep their state and last output
        np.testing.assert_array_equal(final[0][s], init[0][s])
        np.testing.assert_array_equal(final[1][s], init[1][s])
    # Without an initial state the empty sequences end at zero.
    call = _call(x, cu_seqlens=cu)
    o, final = kernels.run(call)
    assert not final[0][[0, 2]].any() and not final[1][[0, 2]].any()
    _close_all((o, final), _oracle(call), dtype)


def test_zero_recurrence_is_the_delta_rule_of_softmax_features() -> None:
    """With every ``R`` and ``r_beta`` zero the rule is the delta rule on ``softmax(q)``,
    ``softmax(k)``, ``v`` and ``sigmoid(beta)`` (the issue's independent check)."""
    x = _inputs(5, 2, 20, 2, 9, 7)
    for n in ("R_q", "R_k", "R_v", "r_beta"):
        x[n] = np.zeros_like(x[n])
    o, _ = kernels.run(_call(x, final=False, scale=0.7))

    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    want = naive.delta_rule(
        softmax(x["q"]), softmax(x["k"]), x["v"], 1.0 / (1.0 + np.exp(-x["beta"])), scale=0.7
    )[0]
    _close(o, want, "float64", "o")


def test_no_final_state() -> None:
    x = _inputs(6, 1, 20, 1, 8, 66)
    o, final = kernels.run(_call(x, final=False))
    assert final is None
    _close(o, _oracle(_call(x))[0], "float64", "o")


def test_large_logits_do_not_overflow() -> None:
    """Max-subtracted softmax, stable sigmoid and tanh: logits of +-500 stay finite."""
    x = _inputs(7, 1, 12, 1, 6, 5)
    x["q"] *= 250.0
    x["k"] *= 250.0
    x["beta"] *= 500.0
    x["R_v"] *= 100.0  # saturates h = tanh(o)
    call = _call(x)
    o, final = kernels.run(call)
    assert np.isfinite(o).all()
    _close_all((o, final), _oracle(call), "float64")


def test_nan_spreads_like_the_oracle() -> None:
    x = _inputs(8, 1, 20, 1, 6, 7)
    x["v"][0, 7, 0, 3] = np.nan
    call = _call(x)
    o, final = kernels.run(call)
    want_o, want_final = _oracle(call)
    np.testing.assert_array_equal(np.isnan(o), np.isnan(want_o))
    np.testing.assert_array_equal(np.isnan(final[0]), np.isnan(want_final[0]))
    _close(o[:, :7], want_o[:, :7], "float64", "o before the NaN")


def test_read_only_inputs_unchanged() -> None:
    x = _inputs(10, 2, 9, 2, 7, 5)
    init = _state(11, 2, 2, 7, 5)
    copies = {n: y.copy() for n, y in x.items()}
    init_copies = tuple(s.copy() for s in init)
    for y in (*x.values(), *init):
        y.flags.writeable = False
    call = _call(x, initial_state=init)
    o, final = kernels.run(call)
    for n, y in x.items():
        np.testing.assert_array_equal(y, copies[n], err_msg=n)
    for s, c in zip(init, init_copies, strict=True):
        np.testing.assert_array_equal(s, c)
    _close_all((o, final), _oracle(call), "float64")


def test_strided_big_endian_and_mixed_inputs() -> None:
    """Inputs of any layout and byte order: the driver converts them as the other ops do."""
    x = _inputs(12, 2, 16, 2, 9, 13)
    init = _state(13, 2, 2, 9, 13)
    want = _oracle(_call(x, initial_state=init))
    y = dict(x)
    y["q"] = np.asfortranarray(x["q"])
    y["v"] = x["v"].astype(">f8")
    big = np.zeros((2, 16, 2, 18))
    big[..., ::2] = x["k"]
    y["k"] = big[..., ::2]  # a strided last axis
    y["beta"] = np.asfortranarray(x["beta"]).astype(">f8")
    y["R_q"] = np.ascontiguousarray(x["R_q"].transpose(0, 2, 1)).transpose(0, 2, 1)
    y["R_v"] = x["R_v"].astype(">f8")
    wide = np.zeros((2, 26))
    wide[:, ::2] = x["r_beta"]
    y["r_beta"] = wide[:, ::2]
    init_y = (np.asfortranarray(init[0]).astype(">f8"), init[1][:, :, ::-1][:, :, ::-1])
    o, final = kernels.run(_call(y, initial_state=init_y, dtype=np.float64))
    _close_all((o, final), want, "float64")
    # Mixed: one float32 input, computed in float64.
    y["R_k"] = x["R_k"].astype(np.float32)
    o, _ = kernels.run(_call(y, initial_state=init_y, dtype=np.float64))
    assert np.max(np.abs(o - want[0])) < 1e-5


# ------------------------------------------------------------------------------- steps


def _steps(x: dict[str, Any], pool: tuple, idx: Any, dtype: Any) -> np.ndarray:
    T = x["q"].shape[1]
    outs = []
    for t in range(T):
        xt = {n: y[:, t : t + 1] if n in ("q", "k", "v", "beta") else y for n, y in x.items()}
        call = _call(xt, pool=pool, state_indices=idx, final=False, dtype=dtype, scale=0.8)
        o, back = kernels.step(call)
        assert back is pool
        outs.append(o)
    return np.stack(outs, axis=1)


def _pool_layout(start: tuple, layout: str, dtype: str) -> tuple:
    S, last = start
    pool_dtype: Any = dtype
    if layout == "other-dtype":
        pool_dtype = np.float32 if dtype == "float64" else np.float64
    if layout == "big-endian":
        pool_dtype = np.dtype(dtype).newbyteorder(">")
    S, last = S.astype(pool_dtype), last.astype(pool_dtype)
    if layout == "F":
        return np.asfortranarray(S), np.asfortranarray(last)
    if layout == "transposed":  # last axes strided
        S = np.ascontiguousarray(S.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
        return S, np.ascontiguousarray(last.transpose(0, 2, 1)).transpose(0, 2, 1)
    return S, last


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layout", ["C", "F", "transposed", "other-dtype", "big-endian"])
def test_steps_equal_the_sequence(layout: str, dtype: str) -> None:
    B, T, H, K, V = 3, 6, 2, 9, 17
    x = _inputs(13, B, T, H, K, V, dtype)
    P = 5
    idx = np.array([4, 0, 2])
    start = _state(14, P, H, K, V, dtype)
    pool = _pool_layout(start, layout, dtype)
    before = tuple(p.copy() for p in pool)
    o = _steps(x, pool, idx, dtype)
    init = tuple(np.asarray(p[idx], dtype) for p in before)
    want_o, want_final = kernels.run(_call(x, initial_state=init, dtype=dtype, scale=0.8))
    tol = dtype
    if layout == "other-dtype":
        tol = "float32"  # the state is rounded to the pool's dtype between steps
    _close(o, want_o, tol, "o")
    _close(pool[0][idx], want_final[0], tol, "S pool")
    _close(pool[1][idx], want_final[1], tol, "o pool")
    untouched = np.setdiff1d(np.arange(P), idx)
    for p, b in zip(pool, before, strict=True):
        np.testing.assert_array_equal(p[untouched], b[untouched])
    # Not bitwise: a step reads R_q, R_k, R_v as given (dot products), a sequence call a
    # transposed copy (register-blocked columns).
    _close(o, _oracle(_call(x, initial_state=init, scale=0.8))[0], tol, "o against the oracle")


def test_step_without_indices() -> None:
    x = _inputs(15, 2, 3, 2, 5, 7)
    start = _state(16, 2, 2, 5, 7)
    pool = tuple(p.copy() for p in start)
    o = _steps(x, pool, None, np.float64)
    want_o, want_final = _oracle(_call(x, initial_state=start, scale=0.8))
    _close(o, want_o, "float64", "o")
    _close(pool[0], want_final[0], "float64", "S pool")
    _close(pool[1], want_final[1], "float64", "o pool")


# ------------------------------------------------------------------- through the public API


@pytest.fixture
def api() -> Any:
    import fastweights

    numba = {b.name: b for b in fastweights.backends.list_backends()}["numba"]
    op = "recurrent_delta_rule"
    assert numba.ops[op] == ("recurrent",) and op in numba.step_ops
    return fastweights


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_api_against_reference(api: Any, dtype: str) -> None:
    x = _inputs(17, 1, 40, 2, 13, 10, dtype)
    cu = np.array([0, 15, 15, 40])
    init = _state(18, 3, 2, 13, 10, dtype)
    kw = {"scale": 0.6, "output_final_state": True, "cu_seqlens": cu}
    args = [x[n] for n in NAMES]
    wide = [np.asarray(a, np.float64) for a in args]
    init64 = tuple(s.astype(np.float64) for s in init)
    want = api.recurrent_delta_rule(*wide, initial_state=init64, **kw, backend="reference")
    got = api.recurrent_delta_rule(*args, initial_state=init, **kw, backend="numba")
    _close(got[0], want[0], dtype, "o")
    _close(got[1][0], want[1][0], dtype, "S")
    _close(got[1][1], want[1][1], dtype, "o_last")


def test_api_step_against_reference(api: Any) -> None:
    x = _inputs(19, 2, 1, 2, 9, 6)
    pool = _state(20, 4, 2, 9, 6)
    ref_pool = tuple(p.copy() for p in pool)
    idx = np.array([3, 1])
    args = [x[n][:, 0] if n in ("q", "k", "v", "beta") else x[n] for n in NAMES]
    o, back = api.step.recurrent_delta_rule(*args, pool, state_indices=idx, backend="numba")
    want, _ = api.step.recurrent_delta_rule(*args, ref_pool, state_indices=idx, backend="reference")
    assert back[0] is pool[0] and back[1] is pool[1]
    _close(o, want, "float64", "o")
    _close(pool[0], ref_pool[0], "float64", "S pool")
    _close(pool[1], ref_pool[1], "float64", "o pool")
