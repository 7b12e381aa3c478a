"""The numba backend's DPLR kernels (``backends/numba/dplr.py``): the recurrent form and the
decoding step against an independent float64 NumPy loop and, through the public API, against
the reference backend.

Shapes cover partial and full value blocks of 64 columns (V = 7, 64, 65, 130), odd key sizes,
T in (1, 2, 15, 17, 63, 65), grouped heads, packed sequences with an empty one, initial and
final states, ``gk`` None (``iplr``), ``gk = -inf`` rows, NaN and Inf propagation, steps on
pools of any layout, read-only inputs. Every kernel is compiled once per dtype (one signature
of layout ``'A'``), so the cases cost little beyond the first call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")

from fastweights.backends import L2NORM_EPS
from fastweights.backends.numba import dplr as kernels
from fastweights.testing import assert_close

# Under NUMBA_DISABLE_JIT=1 (the coverage run) the kernels are Python, and NumPy scalars warn on
# the NaN and Inf the non-finite tests feed them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------- problems


def _inputs(
    seed: int,
    B: int,
    T: int,
    H: int,
    G: int,
    K: int,
    V: int,
    *,
    gate: bool = True,
    dtype: Any = np.float64,
) -> dict[str, Any]:
    """A stable DPLR problem: ``a = -c``, ``b = beta d`` with unit ``c, d``, ``c . d ~ 0.9``
    (the golden cases' construction), unit keys, mild decays."""
    rng = np.random.default_rng(seed)
    HV = H * G

    def unit(*shape: int) -> np.ndarray:
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    c = unit(B, T, HV, K)
    d = c + 0.45 * unit(B, T, HV, K)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    beta = rng.uniform(0.2, 0.9, (B, T, HV, 1))
    out = {
        "q": rng.standard_normal((B, T, H, K)),
        "k": unit(B, T, H, K),
        "v": rng.standard_normal((B, T, HV, V)),
        "a": -c,
        "b": beta * d,
        "gk": -0.3 * rng.random((B, T, HV, K)) if gate else None,
    }
    return {n: None if x is None else x.astype(dtype) for n, x in out.items()}


def _call(
    x: dict[str, Any],
    *,
    G: int = 1,
    scale: float = 0.7,
    initial_state: Any = None,
    cu_seqlens: Any = None,
    l2norm: bool = False,
    final: bool = True,
    dtype: Any = None,
    pool: Any = None,
    state_indices: Any = None,
) -> SimpleNamespace:
    """The fields of a validated ``dplr`` call that the kernels read."""
    B, T, H, K = x["q"].shape
    HV, V = x["v"].shape[2:]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if dtype is None:
        dtype = np.result_type(*(y.dtype for y in x.values() if y is not None), np.float32)
    return SimpleNamespace(
        op="dplr",
        xp=np,
        device="cpu",
        **x,
        g=None,
        beta=None,
        initial_state=initial_state,
        scale=scale,
        use_qk_l2norm=l2norm,
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
        HV=HV,
        K=K,
        V=V,
        N=N,
        state_pool=pool,
        state_indices=None if state_indices is None else np.asarray(state_indices, np.int64),
    )


def _loop(call: SimpleNamespace) -> tuple[np.ndarray, np.ndarray]:
    """The rule step by step in float64 (``gk = -inf`` selects 0 for the decayed row)."""

    def f(x: Any) -> Any:
        return None if x is None else np.asarray(x, np.float64)

    q, k, v, a, b, gk = (f(getattr(call, n)) for n in ("q", "k", "v", "a", "b", "gk"))
    G = call.HV // call.H
    if call.use_qk_l2norm:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + L2NORM_EPS)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + L2NORM_EPS)
    q = q * call.scale
    if call.cu_seqlens is None:
        seqs = [(n, 0, call.T) for n in range(call.B)]
    else:
        cu = call.cu_seqlens
        seqs = [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]
    o = np.zeros(v.shape)
    final = np.zeros((call.N, call.HV, call.K, call.V))
    with np.errstate(all="ignore"):
        for s, (bb, t0, t1) in enumerate(seqs):
            for hv in range(call.HV):
                h = hv // G
                if call.initial_state is None:
                    S = np.zeros((call.K, call.V))
                else:
                    S = f(call.initial_state)[s, hv].copy()
                for t in range(t0, t1):
                    u = a[bb, t, hv] @ S
                    dec = S
                    if gk is not None:
                        g = gk[bb, t, hv]
                        dec = np.where((g == -np.inf)[:, None], 0.0, S * np.exp(g)[:, None])
                    S = dec + np.outer(b[bb, t, hv], u) + np.outer(k[bb, t, h], v[bb, t, hv])
                    o[bb, t, hv] = q[bb, t, h] @ S
                final[s, hv] = S
    return o, final


def _close(got: np.ndarray, want: np.ndarray, dtype: Any, name: str) -> None:
    if np.dtype(dtype) == np.float64:
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
        err = float(np.max(np.abs(got - want), initial=0.0)) / scale
        assert err <= 1e-12, f"{name}: max error {err:.2e} relative to max |{name}|"
    else:
        assert_close(got, want, dtype="float32", form="recurrent", name=name)


# ----------------------------------------------------------------------- the sequence kernel

SHAPES = [
    # B, T, H, G, K, V
    pytest.param(2, 1, 2, 1, 5, 7, id="T1-K5-V7"),
    pytest.param(1, 2, 1, 2, 13, 64, id="T2-G2-V64"),
    pytest.param(2, 15, 1, 1, 17, 65, id="T15-K17-V65"),
    pytest.param(1, 17, 2, 2, 16, 130, id="T17-G2-V130"),
    pytest.param(1, 63, 1, 1, 33, 70, id="T63-K33-V70"),
    pytest.param(2, 65, 1, 3, 8, 9, id="T65-G3-K8-V9"),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("B", "T", "H", "G", "K", "V"), SHAPES)
def test_matches_loop(B: int, T: int, H: int, G: int, K: int, V: int, dtype: str) -> None:
    seed = T * 7 + K
    x = _inputs(seed, B, T, H, G, K, V, gate=seed % 2 == 0, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    init = rng.standard_normal((B, H * G, K, V)).astype(dtype) if T % 2 else None
    call = _call(x, G=G, initial_state=init, l2norm=T % 3 == 0)
    o, final = kernels.run(call)
    want_o, want_final = _loop(call)
    assert o.dtype == np.dtype(dtype) and o.shape == (B, T, H * G, V)
    _close(o, want_o, dtype, "o")
    _close(final, want_final, dtype, "state")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gate", [True, False], ids=["dplr", "iplr"])
def test_packed_sequences_with_an_empty_one(gate: bool, dtype: str) -> None:
    cu = [0, 9, 9, 40, 41]
    x = _inputs(3, 1, 41, 2, 2, 11, 70, gate=gate, dtype=dtype)
    init = np.random.default_rng(4).standard_normal((4, 4, 11, 70)).astype(dtype)
    call = _call(x, G=2, initial_state=init, cu_seqlens=cu, l2norm=True)
    o, final = kernels.run(call)
    want_o, want_final = _loop(call)
    _close(o, want_o, dtype, "o")
    _close(final, want_final, dtype, "state")
    np.testing.assert_array_equal(final[1], init[1])  # the empty sequence keeps its state
    # Without an initial state the empty sequence's final state is zero.
    _, final2 = kernels.run(_call(x, G=2, cu_seqlens=cu))
    assert not final2[1].any()
    _close(final2, _loop(_call(x, G=2, cu_seqlens=cu))[1], dtype, "state")


def test_no_final_state() -> None:
    x = _inputs(5, 1, 20, 1, 1, 8, 66)
    o, final = kernels.run(_call(x, final=False))
    assert final is None
    _close(o, _loop(_call(x))[0], "float64", "o")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_minus_inf_rows_select(dtype: str) -> None:
    """``gk = -inf`` drops its key row's decayed part; the low-rank term still reads it."""
    x = _inputs(6, 1, 33, 1, 2, 12, 70, dtype=dtype)
    gk = x["gk"]
    gk[0, ::4, 0, 3] = -np.inf
    gk[0, 5, 1, :] = -np.inf  # a whole head reset at once
    gk[0, 0, :, 7] = -np.inf  # at the first token
    init = np.random.default_rng(7).standard_normal((1, 2, 12, 70)).astype(dtype)
    call = _call(x, G=2, initial_state=init)
    o, final = kernels.run(call)
    want_o, want_final = _loop(call)
    _close(o, want_o, dtype, "o")
    _close(final, want_final, dtype, "state")


def _same_non_finite(got: np.ndarray, want: np.ndarray, name: str) -> None:
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN")
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"{name}: Inf")
    ok = np.isfinite(want)
    if ok.any():
        _close(np.where(ok, got, 0.0), np.where(ok, want, 0.0), "float64", name)


@pytest.mark.parametrize("where", ["v", "state", "a"])
def test_non_finite_propagate_like_the_loop(where: str) -> None:
    """A NaN (an Inf in the state) spreads causally, exactly as the plain recurrence."""
    x = _inputs(8, 1, 20, 1, 1, 6, 70)
    init = np.random.default_rng(9).standard_normal((1, 1, 6, 70))
    if where == "v":
        x["v"][0, 7, 0, 66] = np.nan
    elif where == "a":
        x["a"][0, 11, 0, 2] = np.nan
    else:
        init[0, 0, 2, 5] = np.inf  # row 2 is reset at the first token, its Inf selected away
        init[0, 0, 4, 66] = np.nan
        x["gk"][0, 0, 0, 2] = -np.inf
    call = _call(x, initial_state=init)
    o, final = kernels.run(call)
    want_o, want_final = _loop(call)
    assert not np.isfinite(want_o).all()
    _same_non_finite(o, want_o, "o")
    _same_non_finite(final, want_final, "state")
    # Outputs before the first non-finite input are untouched.
    first = {"v": 7, "a": 11, "state": 0}[where]
    assert np.isfinite(o[:, :first]).all()


def test_read_only_inputs_unchanged() -> None:
    x = _inputs(10, 2, 9, 1, 2, 7, 65)
    init = np.random.default_rng(11).standard_normal((2, 2, 7, 65))
    copies = {n: y.copy() for n, y in x.items()} | {"init": init.copy()}
    for y in (*x.values(), init):
        y.flags.writeable = False
    call = _call(x, G=2, initial_state=init, l2norm=True)
    o, _ = kernels.run(call)
    for n, y in x.items():
        np.testing.assert_array_equal(y, copies[n], err_msg=n)
    np.testing.assert_array_equal(init, copies["init"])
    _close(o, _loop(call)[0], "float64", "o")


def test_strided_big_endian_and_mixed_inputs() -> None:
    """Inputs of any layout and byte order: the driver converts them as the other ops do."""
    x = _inputs(12, 1, 16, 2, 1, 9, 70)
    want = _loop(_call(x))
    y = dict(x)
    y["q"] = np.asfortranarray(x["q"])
    y["v"] = x["v"].astype(">f8")
    big = np.zeros((1, 16, 2, 18))
    big[..., ::2] = x["a"]
    y["a"] = big[..., ::2]  # a strided last axis
    y["b"] = x["b"].astype(np.float32)  # mixed: computed in float64
    o, _ = kernels.run(_call(y, dtype=np.float64))
    _close(o, _loop(_call(y, dtype=np.float64))[0], "float64", "o")
    assert np.max(np.abs(o - want[0])) < 1e-5  # b rounded to float32


# ------------------------------------------------------------------------------- steps


def _steps(x: dict[str, Any], pool: np.ndarray, idx: Any, G: int, l2norm: bool) -> np.ndarray:
    T = x["q"].shape[1]
    outs = []
    for t in range(T):
        xt = {n: None if y is None else y[:, t : t + 1] for n, y in x.items()}
        call = _call(xt, G=G, pool=pool, state_indices=idx, l2norm=l2norm, final=False)
        o, back = kernels.step(call)
        assert back is pool
        outs.append(o)
    return np.stack(outs, axis=1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layout", ["C", "F", "transposed", "other-dtype"])
def test_steps_equal_the_sequence(layout: str, dtype: str) -> None:
    B, T, H, G, K, V = 3, 6, 1, 2, 9, 70
    x = _inputs(13, B, T, H, G, K, V, dtype=dtype)
    x["gk"][1, 2, 0, 4] = -np.inf
    rng = np.random.default_rng(14)
    P = 5
    idx = np.array([4, 0, 2])
    start = rng.standard_normal((P, H * G, K, V)).astype(dtype)
    pool_dtype = np.float32 if layout == "other-dtype" and dtype == "float64" else dtype
    if layout == "other-dtype" and dtype == "float32":
        pool_dtype = np.float64
    if layout == "F":
        pool = np.asfortranarray(start.astype(pool_dtype))
    elif layout == "transposed":
        pool = np.ascontiguousarray(start.astype(pool_dtype).transpose(0, 1, 3, 2))
        pool = pool.transpose(0, 1, 3, 2)  # [P, HV, K, V] whose last axis is strided
    else:
        pool = start.astype(pool_dtype)
    before = pool.copy()
    o = _steps(x, pool, idx, G, l2norm=True)
    seq = _call(x, G=G, initial_state=before[idx], l2norm=True, dtype=dtype)
    want_o, want_final = kernels.run(seq)
    tol = dtype
    if np.dtype(pool_dtype) != np.dtype(dtype):
        tol = "float32"  # the state is rounded to the pool's dtype between steps
    _close(o, want_o, tol, "o")
    _close(pool[idx], want_final.astype(pool_dtype), tol, "pool")
    untouched = np.setdiff1d(np.arange(P), idx)
    np.testing.assert_array_equal(pool[untouched], before[untouched])
    if tol == dtype:
        # In the pool's own dtype, a step is the sequence kernel on one token: bitwise.
        np.testing.assert_array_equal(o, want_o)


def test_step_without_indices_and_iplr() -> None:
    x = _inputs(15, 2, 3, 2, 1, 5, 7, gate=False)
    pool = np.random.default_rng(16).standard_normal((2, 2, 5, 7))
    start = pool.copy()
    o = _steps(x, pool, None, 1, l2norm=False)
    want_o, want_final = _loop(_call(x, initial_state=start))
    _close(o, want_o, "float64", "o")
    _close(pool, want_final, "float64", "pool")


# ------------------------------------------------------------------- through the public API


@pytest.fixture
def api() -> Any:
    import fastweights

    # The backend declares dplr, so the public calls below must reach these kernels.
    numba = {b.name: b for b in fastweights.backends.list_backends()}["numba"]
    assert numba.ops["dplr"] == ("recurrent",) and "dplr" in numba.step_ops
    return fastweights


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gate", [True, False], ids=["gk", "no-gk"])
def test_api_against_reference(api: Any, gate: bool, dtype: str) -> None:
    x = _inputs(17, 1, 40, 2, 2, 13, 70, gate=gate, dtype=dtype)
    if gate:
        x["gk"][0, 3, 1, 2] = -np.inf
    cu = np.array([0, 15, 15, 40])
    init = np.random.default_rng(18).standard_normal((3, 4, 13, 70)).astype(dtype)
    kw = {
        "scale": 0.6,
        "initial_state": init,
        "output_final_state": True,
        "cu_seqlens": cu,
        "use_qk_l2norm": True,
    }
    args = (x["q"], x["k"], x["v"], x["a"], x["b"], x["gk"])
    wide = [None if y is None else np.asarray(y, np.float64) for y in args]
    want = api.dplr(*wide, **{**kw, "initial_state": init.astype(np.float64)}, backend="reference")
    got = api.dplr(*args, **kw, backend="numba")
    _close(got[0], want[0], dtype, "o")
    _close(got[1], want[1], dtype, "state")


def test_api_step_against_reference(api: Any) -> None:
    x = _inputs(19, 2, 1, 1, 2, 9, 66)
    pool = np.random.default_rng(20).standard_normal((4, 2, 9, 66))
    ref_pool = pool.copy()
    idx = np.array([3, 1])
    args = [x[n][:, 0] for n in ("q", "k", "v", "a", "b", "gk")]
    o = api.step.dplr(*args, pool, state_indices=idx, backend="numba")[0]
    want = api.step.dplr(*args, ref_pool, state_indices=idx, backend="reference")[0]
    _close(o, want, "float64", "o")
    _close(pool, ref_pool, "float64", "pool")
