"""The numba backend's MesaNet kernels (``backends/numba/mesa.py``): the recurrent form and the
decoding step against the float64 oracle ``fastweights.testing.naive.mesa_net`` and, through
the public API, against the golden cases.

Both solvers (the Cholesky solve and fla's conjugate gradient with its ``1e-5`` terms), odd
key and value sizes (K, V in 1 .. 65: padding to 16-lane chunks and to blocks of 4 columns),
T in (1, 2, 15, 17, 63, 65), grouped heads, packed sequences with an empty one, initial and
final states, ``g = -inf`` resets (clearing a NaN state), strided / big-endian / mixed inputs,
steps on pools of any layout, dtype and byte order with ``state_indices``. Every kernel is
compiled once per dtype, so the cases cost little beyond the first call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")

from fastweights.backends.numba import mesa as kernels
from fastweights.testing import assert_close, load_golden_cases, naive

# Under NUMBA_DISABLE_JIT=1 (the coverage run) the kernels are Python, and NumPy scalars warn on
# the NaN the reset test feeds them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------- problems


def _inputs(
    seed: int, B: int, T: int, H: int, G: int, K: int, V: int, *, dtype: Any = np.float64
) -> dict[str, Any]:
    """Unit keys, mild decays, ``beta`` in (0.1, 0.9) and ``lamb`` in (0.25, 1.25) (fla's
    layer: ``softplus + 0.25``)."""
    rng = np.random.default_rng(seed)
    HV = H * G
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    out = {
        "q": rng.standard_normal((B, T, H, K)),
        "k": k,
        "v": rng.standard_normal((B, T, HV, V)),
        "g": -0.3 * rng.random((B, T, HV)),
        "beta": rng.uniform(0.1, 0.9, (B, T, HV)),
        "lamb": rng.uniform(0.25, 1.25, (HV, K)),
    }
    return {n: x.astype(dtype) for n, x in out.items()}


def _state(seed: int, N: int, HV: int, K: int, V: int, dtype: Any = np.float64) -> tuple[Any, Any]:
    """An initial ``(H, G)``: ``H`` symmetric PSD (a decayed sum of ``k k^T``, as in fla)."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((N, HV, K, K + 2)) / np.sqrt(K + 2)
    H = np.einsum("nhkr,nhjr->nhkj", f, f)
    return H.astype(dtype), rng.standard_normal((N, HV, K, V)).astype(dtype)


def _call(
    x: dict[str, Any],
    *,
    solver: str = "exact",
    iterations: int = 30,
    scale: float | None = None,
    initial_state: Any = None,
    cu_seqlens: Any = None,
    l2norm: bool = False,
    final: bool = True,
    dtype: Any = None,
    pool: Any = None,
    state_indices: Any = None,
) -> SimpleNamespace:
    """The fields of a validated ``mesa_net`` call that the kernels read."""
    B, T, H, K = x["q"].shape
    HV, V = x["v"].shape[2:]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if dtype is None:
        dtype = np.result_type(*(y.dtype for y in x.values()), np.float32)
    return SimpleNamespace(
        op="mesa_net",
        xp=np,
        device="cpu",
        **x,
        inputs={n: x[n] for n in ("g", "beta", "lamb")},
        options={"solver": solver, "max_cg_iterations": iterations},
        initial_state=initial_state,
        scale=K**-0.5 if scale is None else scale,
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


def _oracle(call: SimpleNamespace) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    o, state = naive.mesa_net(
        call.q, call.k, call.v, call.g, call.beta, call.lamb,
        solver=call.options["solver"], max_cg_iterations=call.options["max_cg_iterations"],
        scale=call.scale, initial_state=call.initial_state, output_final_state=True,
        cu_seqlens=call.cu_seqlens, use_qk_l2norm=call.use_qk_l2norm,
    )  # fmt: skip
    return np.asarray(o, np.float64), state


def _close(got: Any, want: Any, dtype: Any, name: str) -> None:
    if np.dtype(dtype) == np.float64:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
        err = float(np.max(np.abs(got - want), initial=0.0)) / scale
        assert err <= 1e-10, f"{name}: max error {err:.2e} relative to max |{name}|"
    else:
        assert_close(got, want, dtype="float32", form="recurrent", name=name)


def _check(call: SimpleNamespace, dtype: Any) -> tuple[np.ndarray, Any]:
    o, final = kernels.run(call)
    want_o, want_final = _oracle(call)
    assert o.dtype == call.v.dtype and o.shape == call.v.shape
    _close(o, want_o, dtype, "o")
    if call.output_final_state:
        assert all(s.dtype == np.dtype(dtype) for s in final)
        _close(final[0], want_final[0], dtype, "H")
        _close(final[1], want_final[1], dtype, "G")
    else:
        assert final is None
    return o, final


# ----------------------------------------------------------------------- the sequence kernel

SHAPES = [
    # B, T, H, G, K, V
    pytest.param(2, 1, 2, 1, 5, 7, id="T1-K5-V7"),
    pytest.param(1, 2, 1, 2, 1, 1, id="T2-G2-K1-V1"),
    pytest.param(2, 15, 1, 1, 17, 65, id="T15-K17-V65"),
    pytest.param(1, 17, 2, 2, 16, 2, id="T17-G2-K16-V2"),
    pytest.param(1, 63, 1, 1, 63, 15, id="T63-K63-V15"),
    pytest.param(1, 65, 1, 3, 8, 9, id="T65-G3-K8-V9"),
    pytest.param(1, 9, 1, 1, 65, 33, id="T9-K65-V33"),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("B", "T", "H", "G", "K", "V"), SHAPES)
def test_exact_matches_oracle(B: int, T: int, H: int, G: int, K: int, V: int, dtype: str) -> None:
    seed = T * 7 + K
    x = _inputs(seed, B, T, H, G, K, V, dtype=dtype)
    init = _state(seed + 1, B, H * G, K, V, dtype) if T % 2 else None
    _check(_call(x, initial_state=init, l2norm=T % 3 == 0), dtype)


CG_SHAPES = [
    pytest.param(2, 1, 2, 1, 5, 7, 30, id="T1-K5-V7"),
    pytest.param(1, 17, 2, 2, 16, 2, 30, id="T17-G2-K16-V2"),
    pytest.param(1, 15, 1, 1, 33, 65, 3, id="T15-K33-V65-it3"),
    pytest.param(2, 9, 1, 1, 1, 17, 1, id="T9-K1-it1"),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("B", "T", "H", "G", "K", "V", "iterations"), CG_SHAPES)
def test_cg_matches_oracle(
    B: int, T: int, H: int, G: int, K: int, V: int, iterations: int, dtype: str
) -> None:
    """fla's CG exactly: ``x = 0``, the given number of steps, ``1e-5`` in both denominators."""
    seed = T * 5 + K
    x = _inputs(seed, B, T, H, G, K, V, dtype=dtype)
    init = _state(seed + 1, B, H * G, K, V, dtype) if T % 2 else None
    call = _call(x, solver="cg", iterations=iterations, initial_state=init, l2norm=T % 3 == 0)
    _check(call, dtype)


def test_cg_is_not_the_exact_solve() -> None:
    """The CG's ``1e-5`` terms leave it measurably off the exact solve (the oracle's, too)."""
    x = _inputs(1, 1, 12, 1, 1, 16, 8)
    o_cg, _ = kernels.run(_call(x, solver="cg", iterations=3))
    o_ex, _ = kernels.run(_call(x))
    assert np.max(np.abs(o_cg - o_ex)) > 1e-6


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_packed_sequences_with_an_empty_one(solver: str, dtype: str) -> None:
    cu = [0, 9, 9, 40, 41]
    x = _inputs(3, 1, 41, 2, 2, 11, 20, dtype=dtype)
    init = _state(4, 4, 4, 11, 20, dtype)
    call = _call(x, solver=solver, initial_state=init, cu_seqlens=cu, l2norm=True, scale=0.8)
    _, final = _check(call, dtype)
    for part, start in zip(final, init, strict=True):  # the empty sequence keeps its state
        np.testing.assert_array_equal(part[1], start[1])
    # Without an initial state the empty sequence's final state is zero.
    _, final2 = _check(_call(x, solver=solver, cu_seqlens=cu), dtype)
    assert not final2[0][1].any() and not final2[1][1].any()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_minus_inf_resets_both_states(dtype: str) -> None:
    """``g = -inf`` selects 0 for the decayed states: even a NaN/Inf initial state is cleared."""
    x = _inputs(6, 2, 21, 1, 2, 12, 10, dtype=dtype)
    x["g"][0, 0, 1] = -np.inf  # head 1 of sequence 0 at the first token
    x["g"][1, 7, :] = -np.inf  # both heads mid-sequence
    x["g"][0, 20, 0] = -np.inf  # at the last token
    H0, G0 = _state(7, 2, 2, 12, 10, dtype)
    H0[0, 1, 3, 4] = H0[0, 1, 4, 3] = np.nan
    G0[0, 1, 2, 5] = np.inf
    o, final = kernels.run(_call(x, initial_state=(H0, G0)))
    assert np.isfinite(o).all() and all(np.isfinite(s).all() for s in final)
    clean = (H0.copy(), G0.copy())
    clean[0][0, 1], clean[1][0, 1] = 0.0, 0.0  # what the reset leaves of the bad head
    want_o, want_final = _oracle(_call(x, initial_state=clean))
    _close(o, want_o, dtype, "o")
    _close(final[0], want_final[0], dtype, "H")
    _close(final[1], want_final[1], dtype, "G")
    # The same with CG (its matrix-vector products read the whole of H).
    o_cg, _ = kernels.run(_call(x, solver="cg", initial_state=(H0, G0)))
    assert np.isfinite(o_cg).all()


def test_read_only_inputs_unchanged() -> None:
    x = _inputs(10, 2, 9, 1, 2, 7, 6)
    init = _state(11, 2, 2, 7, 6)
    copies = {n: y.copy() for n, y in x.items()}
    for y in (*x.values(), *init):
        y.flags.writeable = False
    call = _call(x, initial_state=init, l2norm=True)
    _check(call, "float64")
    for n, y in x.items():
        np.testing.assert_array_equal(y, copies[n], err_msg=n)


def test_strided_big_endian_and_mixed_inputs() -> None:
    """Inputs of any layout and byte order: converted as the other ops convert them."""
    x = _inputs(12, 1, 16, 2, 1, 9, 20)
    init = _state(13, 1, 2, 9, 20)
    want = kernels.run(_call(x, initial_state=init))
    y = dict(x)
    y["q"] = np.asfortranarray(x["q"])
    y["v"] = x["v"].astype(">f8")
    big = np.zeros((1, 16, 2, 18))
    big[..., ::2] = x["k"]
    y["k"] = big[..., ::2]  # a strided last axis
    y["lamb"] = x["lamb"].astype(">f8")[:, ::-1][:, ::-1]
    y["beta"] = x["beta"].astype(np.float32)  # mixed: computed in float64
    H0 = np.asfortranarray(init[0]).astype(">f8")
    G0 = init[1].transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)
    call = _call(y, initial_state=(H0, G0), dtype=np.float64)
    o, _ = _check(call, "float64")
    assert o.dtype == np.dtype(">f8")
    assert np.max(np.abs(o - want[0])) < 1e-5  # beta rounded to float32
    # float32 compute from float32 inputs of another byte order.
    z = {n: a.astype(">f4") for n, a in x.items()}
    o32, _ = kernels.run(_call(z, final=False))
    assert_close(o32, _oracle(_call(z))[0], dtype="float32", form="recurrent")


# ------------------------------------------------------------------------------- steps


def _steps(
    x: dict[str, Any], pools: tuple[Any, Any], idx: Any, solver: str, l2norm: bool
) -> np.ndarray:
    T = x["q"].shape[1]
    outs = []
    for t in range(T):
        xt = {n: (y if n == "lamb" else y[:, t : t + 1]) for n, y in x.items()}
        call = _call(xt, solver=solver, pool=pools, state_indices=idx, l2norm=l2norm, final=False)
        o, back = kernels.step(call)
        assert back is pools
        outs.append(o)
    return np.stack(outs, axis=1)


def _layout(a: np.ndarray, how: str, dtype: Any) -> np.ndarray:
    if how == "F":
        return np.asfortranarray(a.astype(dtype))
    if how == "transposed":  # a strided last axis
        return np.ascontiguousarray(a.astype(dtype).transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    if how == "big-endian":
        return a.astype(np.dtype(dtype).newbyteorder(">"))
    return a.astype(dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("h_layout", "g_layout"),
    [("C", "C"), ("F", "transposed"), ("big-endian", "C"), ("other-dtype", "F")],
)
def test_steps_equal_the_sequence(h_layout: str, g_layout: str, dtype: str) -> None:
    B, T, H, G, K, V = 3, 6, 1, 2, 9, 20
    x = _inputs(13, B, T, H, G, K, V, dtype=dtype)
    x["g"][1, 2, 0] = -np.inf
    P = 5
    idx = np.array([4, 0, 2])
    start = _state(14, P, H * G, K, V, dtype)
    other = np.float32 if dtype == "float64" else np.float64
    hd = other if h_layout == "other-dtype" else dtype
    pools = (
        _layout(start[0], "C" if h_layout == "other-dtype" else h_layout, hd),
        _layout(start[1], g_layout, dtype),
    )
    before = (pools[0].copy(), pools[1].copy())
    for solver in ("exact", "cg"):
        pools[0][...] = before[0]
        pools[1][...] = before[1]
        o = _steps(x, pools, idx, solver, l2norm=True)
        init = (before[0][idx], before[1][idx])
        want_o, want_final = kernels.run(
            _call(x, solver=solver, initial_state=init, l2norm=True, dtype=dtype)
        )
        # H rounded to the pool's dtype at every step.
        tol = "float32" if np.dtype(hd) != np.dtype(dtype) else dtype
        _close(o, want_o, tol, "o")
        _close(pools[0][idx], want_final[0], tol, "H pool")
        _close(pools[1][idx], want_final[1], tol, "G pool")
        untouched = np.setdiff1d(np.arange(P), idx)
        for p, b in zip(pools, before, strict=True):
            np.testing.assert_array_equal(p[untouched], b[untouched])
        if tol == dtype:
            # In the pools' own dtype, a step is the sequence kernel on one token: bitwise.
            np.testing.assert_array_equal(o, want_o)


def test_step_without_indices_matches_oracle() -> None:
    x = _inputs(15, 2, 4, 2, 1, 5, 7)
    start = _state(16, 2, 2, 5, 7)
    pools = (start[0].copy(), start[1].copy())
    o = _steps(x, pools, None, "exact", l2norm=False)
    want_o, want_final = _oracle(_call(x, initial_state=start))
    _close(o, want_o, "float64", "o")
    _close(pools[0], want_final[0], "float64", "H pool")
    _close(pools[1], want_final[1], "float64", "G pool")


# ------------------------------------------------------------------- through the public API


@pytest.fixture
def api() -> Any:
    import fastweights

    numba = {b.name: b for b in fastweights.backends.list_backends()}["numba"]
    assert "mesa_net" in numba.ops and "mesa_net" in numba.step_ops
    return fastweights


MESA_GOLDEN = [c for c in load_golden_cases() if c.op == "mesa_net"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", MESA_GOLDEN, ids=[c.name for c in MESA_GOLDEN])
def test_golden_cases(api: Any, case: Any, dtype: str) -> None:
    call = case.cast(np.dtype(dtype))
    o, state = call.run(api.mesa_net, backend="numba", output_final_state=case.has_final_state)
    case.check(o, state, dtype=dtype, form="recurrent")


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_api_against_oracle(api: Any, solver: str) -> None:
    x = _inputs(17, 1, 40, 2, 2, 13, 10)
    cu = np.array([0, 15, 15, 40])
    init = _state(18, 3, 4, 13, 10)
    kw = {
        "solver": solver,
        "max_cg_iterations": 7,
        "scale": 0.6,
        "initial_state": init,
        "output_final_state": True,
        "cu_seqlens": cu,
        "use_qk_l2norm": True,
    }
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "lamb")]
    o, (H, G) = api.mesa_net(*args, **kw, backend="numba")
    want_o, (want_H, want_G) = naive.mesa_net(*args, **kw)
    _close(o, want_o, "float64", "o")
    _close(H, want_H, "float64", "H")
    _close(G, want_G, "float64", "G")


def test_api_step_against_oracle(api: Any) -> None:
    x = _inputs(19, 2, 1, 1, 2, 9, 6)
    start = _state(20, 4, 2, 9, 6)
    pools = (start[0].copy(), start[1].copy())
    idx = np.array([3, 1])
    args = [x[n][:, 0] for n in ("q", "k", "v", "g", "beta")] + [x["lamb"]]
    o, back = api.step.mesa_net(*args, pools, state_indices=idx, backend="numba")
    assert back is pools
    init = (start[0][idx], start[1][idx])
    want_o, (want_H, want_G) = naive.mesa_net(
        *[x[n] for n in ("q", "k", "v", "g", "beta", "lamb")],
        initial_state=init,
        output_final_state=True,
    )
    _close(o, want_o[:, 0], "float64", "o")
    _close(pools[0][idx], want_H, "float64", "H pool")
    _close(pools[1][idx], want_G, "float64", "G pool")
