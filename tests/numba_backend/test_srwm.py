"""The numba backend's self-referential weight matrix kernels (``backends/numba/srwm.py``): the
recurrent form and the decoding step against the float64 oracle
``fastweights.testing.naive.srwm`` and, through the public API, against the reference backend.

Shapes cover weights of one to several column blocks (``Wd = V + 2K + 4`` from 7 to 260), odd
sizes, T in (1, 2, 15, 17, 63, 65), packed sequences with empty ones, ``W0`` and initial
states, inputs of any layout and byte order, steps on pools of any layout, read-only inputs.
The kernel is compiled once per dtype (one signature of layout ``'A'``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")

from fastweights.backends.numba import srwm as kernels
from fastweights.testing import assert_close, naive

# Under NUMBA_DISABLE_JIT=1 (the coverage run) the kernels are Python, and NumPy scalars warn on
# the NaN the non-finite test feeds them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _inputs(seed: int, B: int, T: int, H: int, K: int, V: int, dtype: Any = np.float64) -> dict:
    """``x`` of scale 2 (peaked softmax features) and ``W0`` of order one."""
    rng = np.random.default_rng(seed)
    return {
        "x": (2.0 * rng.standard_normal((B, T, H, K))).astype(dtype),
        "W0": rng.standard_normal((H, K, V + 2 * K + 4)).astype(dtype),
    }


def _weights(seed: int, N: int, H: int, K: int, V: int, dtype: Any = np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, H, K, V + 2 * K + 4)).astype(dtype)


def _call(
    x: np.ndarray,
    W0: Any,
    *,
    initial_state: Any = None,
    cu_seqlens: Any = None,
    final: bool = True,
    dtype: Any = None,
    pool: Any = None,
    state_indices: Any = None,
) -> SimpleNamespace:
    """The fields of a validated ``srwm`` call that the kernels read."""
    B, T, H, K = x.shape
    Wd = next(w for w in (W0, initial_state, pool) if w is not None).shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if dtype is None:
        dtype = np.result_type(*(y.dtype for y in (x, W0) if y is not None), np.float32)
    return SimpleNamespace(
        op="srwm",
        xp=np,
        device="cpu",
        q=None,
        k=None,
        v=None,
        x=x,
        W0=W0,
        initial_state=initial_state,
        scale=1.0,
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
        V=Wd - 2 * K - 4,
        N=N,
        state_pool=pool,
        state_indices=None if state_indices is None else np.asarray(state_indices, np.int64),
    )


def _oracle(call: SimpleNamespace) -> tuple[np.ndarray, np.ndarray]:
    init = call.initial_state
    o, final = naive.srwm(
        np.asarray(call.x, np.float64),
        np.asarray(call.W0, np.float64),
        initial_state=None if init is None else np.asarray(init, np.float64),
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


# ----------------------------------------------------------------------- the sequence kernel

SHAPES = [
    # B, T, H, K, V  (Wd = V + 2K + 4)
    pytest.param(2, 1, 2, 1, 1, id="T1-K1-V1"),
    pytest.param(1, 2, 1, 2, 2, id="T2-K2-V2"),
    pytest.param(2, 15, 2, 15, 17, id="T15-K15-V17"),
    pytest.param(1, 17, 3, 17, 15, id="T17-K17-V15"),
    pytest.param(1, 63, 1, 63, 65, id="T63-K63-V65"),
    pytest.param(1, 65, 2, 65, 63, id="T65-K65-V63"),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("B", "T", "H", "K", "V"), SHAPES)
def test_matches_oracle(B: int, T: int, H: int, K: int, V: int, dtype: str) -> None:
    seed = T * 7 + K
    x = _inputs(seed, B, T, H, K, V, dtype)
    init = _weights(seed + 1, B, H, K, V, dtype) if T % 2 else None
    call = _call(**x, initial_state=init)
    o, final = kernels.run(call)
    assert o.dtype == np.dtype(dtype) and o.shape == (B, T, H, V)
    assert final.dtype == np.dtype(dtype)
    want_o, want_final = _oracle(call)
    _close(o, want_o, dtype, "o")
    _close(final, want_final, dtype, "W")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_packed_sequences_with_empty_ones(dtype: str) -> None:
    cu = [0, 0, 9, 9, 40, 41]
    x = _inputs(3, 1, 41, 2, 11, 20, dtype)
    init = _weights(4, 5, 2, 11, 20, dtype)
    for initial in (init, None):
        call = _call(**x, initial_state=initial, cu_seqlens=cu)
        o, final = kernels.run(call)
        want_o, want_final = _oracle(call)
        _close(o, want_o, dtype, "o")
        _close(final, want_final, dtype, "W")
        for s in (0, 2):  # the empty sequences keep their weight (W0 without initial_state)
            np.testing.assert_array_equal(final[s], x["W0"] if initial is None else init[s])


def test_no_final_state() -> None:
    x = _inputs(6, 1, 20, 1, 8, 30)
    o, final = kernels.run(_call(**x, final=False))
    assert final is None
    _close(o, _oracle(_call(**x))[0], "float64", "o")


def test_hand_derived_two_steps() -> None:
    """Two tokens of a one-feature head (D = 1: ``phi = 1`` whatever its input): ``W`` is one
    row ``[y, k, q, b0..b3]``, ``v = vbar = W``, so ``W`` never changes and both outputs are
    ``y``."""
    W0 = np.array([[[0.5, -1.0, 2.0, 3.0, 0.1, 0.2, 0.3, 0.4]]])  # H=1, D=1, V=1
    x = np.array([[[[0.3]], [[-7.0]]]])
    o, W = kernels.run(_call(x, W0))
    np.testing.assert_allclose(o[0, :, 0, 0], [0.5, 0.5], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(W[0], W0)


def test_large_inputs_do_not_overflow() -> None:
    """Max-subtracted softmax and a stable sigmoid: inputs and weights of +-500 stay finite."""
    x = _inputs(7, 1, 12, 1, 6, 5)
    x["x"] *= 250.0
    x["W0"] *= 100.0
    call = _call(**x)
    o, final = kernels.run(call)
    assert np.isfinite(o).all()
    want_o, want_final = _oracle(call)
    _close(o, want_o, "float64", "o")
    _close(final, want_final, "float64", "W")


def test_nan_spreads_like_the_oracle() -> None:
    x = _inputs(8, 1, 20, 1, 6, 7)
    x["x"][0, 7, 0, 3] = np.nan
    call = _call(**x)
    o, final = kernels.run(call)
    want_o, want_final = _oracle(call)
    np.testing.assert_array_equal(np.isnan(o), np.isnan(want_o))
    np.testing.assert_array_equal(np.isnan(final), np.isnan(want_final))
    _close(o[:, :7], want_o[:, :7], "float64", "o before the NaN")


def test_read_only_inputs_unchanged() -> None:
    x = _inputs(10, 2, 9, 2, 7, 5)
    init = _weights(11, 2, 2, 7, 5)
    copies = {n: y.copy() for n, y in x.items()}
    init_copy = init.copy()
    for y in (*x.values(), init):
        y.flags.writeable = False
    for initial in (init, None):
        call = _call(**x, initial_state=initial)
        o, final = kernels.run(call)
        want_o, want_final = _oracle(call)
        _close(o, want_o, "float64", "o")
        _close(final, want_final, "float64", "W")
    for n, y in x.items():
        np.testing.assert_array_equal(y, copies[n], err_msg=n)
    np.testing.assert_array_equal(init, init_copy)


def test_strided_big_endian_and_mixed_inputs() -> None:
    """Inputs of any layout and byte order: the driver converts them as the other ops do."""
    x = _inputs(12, 2, 16, 2, 9, 13)
    init = _weights(13, 2, 2, 9, 13)
    want = _oracle(_call(**x))
    want_init = _oracle(_call(**x, initial_state=init))
    big = np.zeros((2, 16, 2, 18))
    big[..., ::2] = x["x"]
    xs = big[..., ::2]  # a strided last axis
    W0 = np.ascontiguousarray(x["W0"].transpose(0, 2, 1)).transpose(0, 2, 1).astype(">f8")
    o, final = kernels.run(_call(xs, W0, dtype=np.float64))
    _close(o, want[0], "float64", "o")
    _close(final, want[1], "float64", "W")
    o, final = kernels.run(
        _call(
            np.asfortranarray(x["x"]).astype(">f8"),
            x["W0"],
            initial_state=init[..., ::-1][..., ::-1],
        )
    )
    _close(o, want_init[0], "float64", "o")
    _close(final, want_init[1], "float64", "W")
    # Mixed: a float32 input, computed in float64.
    o, _ = kernels.run(_call(x["x"].astype(np.float32), x["W0"], dtype=np.float64))
    assert o.dtype == np.float32  # o has x's dtype
    assert np.max(np.abs(o - want[0])) < 1e-5


# ------------------------------------------------------------------------------- steps


def _steps(x: np.ndarray, pool: np.ndarray, idx: Any, dtype: Any) -> np.ndarray:
    outs = []
    for t in range(x.shape[1]):
        call = _call(x[:, t : t + 1], None, pool=pool, state_indices=idx, final=False, dtype=dtype)
        o, back = kernels.step(call)
        assert back is pool
        outs.append(o)
    return np.stack(outs, axis=1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layout", ["C", "F", "transposed", "other-dtype", "big-endian"])
def test_steps_equal_the_sequence(layout: str, dtype: str) -> None:
    B, T, H, K, V = 3, 6, 2, 9, 17
    x = _inputs(13, B, T, H, K, V, dtype)["x"]
    P = 5
    idx = np.array([4, 0, 2])
    start = _weights(14, P, H, K, V, dtype)
    pool_dtype: Any = dtype
    if layout == "other-dtype":
        pool_dtype = np.float32 if dtype == "float64" else np.float64
    if layout == "big-endian":
        pool_dtype = np.dtype(dtype).newbyteorder(">")
    pool = start.astype(pool_dtype)
    if layout == "F":
        pool = np.asfortranarray(pool)
    elif layout == "transposed":  # a strided last axis
        pool = np.ascontiguousarray(pool.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    before = pool.copy()
    o = _steps(x, pool, idx, dtype)
    init = np.asarray(before[idx], dtype)
    want_o, want_final = kernels.run(_call(x, None, initial_state=init, dtype=dtype))
    tol = "float32" if layout == "other-dtype" else dtype
    _close(o, want_o, tol, "o")
    _close(pool[idx], want_final, tol, "pool")
    untouched = np.setdiff1d(np.arange(P), idx)
    np.testing.assert_array_equal(pool[untouched], before[untouched])
    # Not bitwise: a sequence reads W_t^T phi(x_{t+1}) as W_{t-1}^T phi(x_{t+1}) plus the
    # rank-one correction (one pass per token), a step from the stored W_t.
    W0 = np.zeros((H, K, V + 2 * K + 4))  # replaced by the initial state
    _close(o, _oracle(_call(x, W0, initial_state=init))[0], tol, "o against the oracle")


def test_step_without_indices() -> None:
    x = _inputs(15, 2, 3, 2, 5, 7)
    start = _weights(16, 2, 2, 5, 7)
    pool = start.copy()
    o = _steps(x["x"], pool, None, np.float64)
    want_o, want_final = _oracle(_call(**x, initial_state=start))
    _close(o, want_o, "float64", "o")
    _close(pool, want_final, "float64", "pool")


# ------------------------------------------------------------------- through the public API


@pytest.fixture
def api() -> Any:
    import fastweights

    numba = {b.name: b for b in fastweights.backends.list_backends()}["numba"]
    assert numba.ops["srwm"] == ("recurrent",) and "srwm" in numba.step_ops
    return fastweights


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_api_against_reference(api: Any, dtype: str) -> None:
    x = _inputs(17, 1, 40, 2, 13, 10, dtype)
    cu = np.array([0, 15, 15, 40])
    init = _weights(18, 3, 2, 13, 10, dtype)
    wide = {n: np.asarray(y, np.float64) for n, y in x.items()}
    for initial in (init, None):
        kw = {"output_final_state": True, "cu_seqlens": cu, "initial_state": initial}
        want = api.srwm(
            **wide,
            **{**kw, "initial_state": None if initial is None else initial.astype(np.float64)},
            backend="reference",
        )
        got = api.srwm(**x, **kw, backend="numba")
        _close(got[0], want[0], dtype, "o")
        _close(got[1], want[1], dtype, "W")


def test_api_step_against_reference(api: Any) -> None:
    x = _inputs(19, 2, 1, 2, 9, 6)["x"][:, 0]
    pool = _weights(20, 4, 2, 9, 6)
    ref_pool = pool.copy()
    idx = np.array([3, 1])
    o, back = api.step.srwm(x, pool, state_indices=idx, backend="numba")
    want, _ = api.step.srwm(x, ref_pool, state_indices=idx, backend="reference")
    assert back is pool
    _close(o, want, "float64", "o")
    _close(pool, ref_pool, "float64", "pool")
