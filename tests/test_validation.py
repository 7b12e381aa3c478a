"""API.md "Errors": bad input raises before any work, naming the argument.

``ValueError`` for shapes, values and ``cu_seqlens`` (its dtype included); ``TypeError`` for
dtypes, namespaces, devices and backends. Values are not checked: NaN and Inf propagate.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from _support import FakeBackend, engines, run

import fastweights
import fastweights.step
from fastweights.testing import Call, random_call, to_numpy


def _call(op: str = "gated_delta_rule", **kw: Any) -> Call:
    kw.setdefault("initial_state", False)
    return random_call(op, seed=0, batch=2, length=6, heads=2, key_dim=4, value_dim=3, **kw)


def _with(call: Call, **arrays: Any) -> Call:
    return replace(call, arrays={**call.arrays, **arrays})


def _packed(op: str = "gated_delta_rule", **kw: Any) -> Call:
    return _call(op, seqlens=[2, 0, 4], **kw)


def _positive(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[0, 1, 0, ...] = 0.25
    return x


_GDR = _call()
_A = _GDR.arrays
_GLA = _call("gla")
_DP = _call("delta_product")
_PACKED = _packed()
_CU = _PACKED.arrays["cu_seqlens"]
_STATE = np.zeros((2, 2, 4, 3))

# (id, call, extra keywords, expected exception, regex the message must match)
BAD_CALLS: list[tuple[str, Call, dict[str, Any], type[Exception], str]] = [
    ("q rank 3", _with(_GDR, q=_A["q"][0]), {}, ValueError, r"\bq\b"),
    ("k rank 5", _with(_GDR, k=_A["k"][None]), {}, ValueError, r"\bk\b"),
    ("v rank 3", _with(_GDR, v=_A["v"][..., 0]), {}, ValueError, r"\bv\b"),
    ("k batch", _with(_GDR, k=_A["k"][:1]), {}, ValueError, r"\bk\b"),
    ("k length", _with(_GDR, k=_A["k"][:, :5]), {}, ValueError, r"\bk\b"),
    ("k heads", _with(_GDR, k=_A["k"][:, :, :1]), {}, ValueError, r"\bk\b"),
    ("k key dim", _with(_GDR, k=_A["k"][..., :3]), {}, ValueError, r"\bk\b"),
    ("v batch", _with(_GDR, v=_A["v"][:1]), {}, ValueError, r"\bv\b"),
    ("v length", _with(_GDR, v=_A["v"][:, :5]), {}, ValueError, r"\bv\b"),
    (
        "HV not a multiple of H",
        _with(_GDR, v=np.zeros((2, 6, 3, 3)), g=np.zeros((2, 6, 3)), beta=np.ones((2, 6, 3))),
        {},
        ValueError,
        r"\bv\b|HV",
    ),
    ("g length", _with(_GDR, g=_A["g"][:, :5]), {}, ValueError, r"\bg\b"),
    ("g heads", _with(_GDR, g=_A["g"][..., :1]), {}, ValueError, r"\bg\b"),
    ("g rank 4", _with(_GDR, g=_A["g"][..., None]), {}, ValueError, r"\bg\b"),
    ("gk key dim", _with(_GLA, gk=_GLA.arrays["gk"][..., :3]), {}, ValueError, r"\bgk\b"),
    ("gk rank 3", _with(_GLA, gk=_GLA.arrays["gk"][..., 0]), {}, ValueError, r"\bgk\b"),
    ("beta length", _with(_GDR, beta=_A["beta"][:, :5]), {}, ValueError, r"\bbeta\b"),
    ("beta value dim", _with(_GDR, beta=np.ones((2, 6, 2, 4))), {}, ValueError, r"\bbeta\b"),
    (
        "delta_product k rows",
        _with(_DP, k=_DP.arrays["k"][:, :-1]),
        {},
        ValueError,
        r"\bk\b",
    ),
    (
        "num_householder 0",
        replace(_DP, kwargs={"num_householder": 0}),
        {},
        ValueError,
        "num_householder",
    ),
    ("g > 0", _with(_GDR, g=_positive(_A["g"])), {}, ValueError, r"\bg\b"),
    ("gk > 0", _with(_GLA, gk=_positive(_GLA.arrays["gk"])), {}, ValueError, r"\bgk\b"),
    ("initial_state N", _with(_GDR, initial_state=_STATE[:1]), {}, ValueError, "initial_state"),
    (
        "initial_state HV",
        _with(_GDR, initial_state=_STATE[:, :1]),
        {},
        ValueError,
        "initial_state",
    ),
    ("initial_state K", _with(_GDR, initial_state=_STATE[:, :, :3]), {}, ValueError, "initial_st"),
    ("initial_state V", _with(_GDR, initial_state=_STATE[..., :2]), {}, ValueError, "initial_st"),
    ("initial_state rank", _with(_GDR, initial_state=_STATE[0]), {}, ValueError, "initial_st"),
    (
        "initial_state N packed",
        _with(_PACKED, initial_state=np.zeros((2, 2, 4, 3))),
        {},
        ValueError,
        "initial_state",
    ),
    ("cu float", _with(_PACKED, cu_seqlens=_CU.astype(float)), {}, ValueError, "cu_seqlens"),
    ("cu 2-D", _with(_PACKED, cu_seqlens=_CU[None]), {}, ValueError, "cu_seqlens"),
    ("cu scalar", _with(_PACKED, cu_seqlens=np.int64(6)), {}, ValueError, "cu_seqlens"),
    ("cu one entry", _with(_PACKED, cu_seqlens=np.array([6])), {}, ValueError, "cu_seqlens"),
    ("cu bool", _with(_PACKED, cu_seqlens=np.array([0, 1]) > 0), {}, ValueError, "cu_seqlens"),
    ("cu start", _with(_PACKED, cu_seqlens=np.array([1, 2, 2, 6])), {}, ValueError, "cu_seqlens"),
    ("cu end", _with(_PACKED, cu_seqlens=np.array([0, 2, 2, 5])), {}, ValueError, "cu_seqlens"),
    ("cu order", _with(_PACKED, cu_seqlens=np.array([0, 4, 2, 6])), {}, ValueError, "cu_seqlens"),
    (
        "cu with B = 2",
        _with(_GDR, cu_seqlens=np.array([0, 3, 6])),
        {},
        ValueError,
        "cu_seqlens|B",
    ),
    ("chunk_size 0", _GDR, {"chunk_size": 0}, ValueError, "chunk_size"),
    ("chunk_size -3", _GDR, {"chunk_size": -3}, ValueError, "chunk_size"),
    ("unknown form", _GDR, {"form": "fast"}, ValueError, "form"),
    ("parallel gla", _GLA, {"form": "parallel"}, ValueError, "parallel"),
    ("parallel kda", _call("kda"), {"form": "parallel"}, ValueError, "parallel"),
    ("parallel delta_product", _DP, {"form": "parallel"}, ValueError, "parallel"),
    ("parallel packed", _PACKED, {"form": "parallel"}, ValueError, "parallel"),
    (
        "chunk per-value beta",
        _call("delta_rule", beta_per_value=True),
        {"form": "chunk"},
        ValueError,
        "chunk",
    ),
    (
        "parallel per-value beta",
        _call("gated_delta_rule", beta_per_value=True),
        {"form": "parallel"},
        ValueError,
        "parallel",
    ),
    ("integer q", _with(_GDR, q=_A["q"].astype(np.int64)), {}, TypeError, r"\bq\b"),
    ("complex v", _with(_GDR, v=_A["v"].astype(np.complex128)), {}, TypeError, r"\bv\b"),
    ("integer g", _with(_GDR, g=_A["g"].astype(np.int32)), {}, TypeError, r"\bg\b"),
    ("bool beta", _with(_GDR, beta=_A["beta"] > 0.5), {}, TypeError, r"\bbeta\b"),
    (
        "integer initial_state",
        _with(_GDR, initial_state=np.zeros((2, 2, 4, 3), dtype=np.int64)),
        {},
        TypeError,
        "initial_state",
    ),
]


@pytest.mark.parametrize(
    ("call", "extra", "exc", "match"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_CALLS],
)
def test_bad_input_raises_naming_the_argument(
    call: Call, extra: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        run(call, **extra)


@pytest.mark.parametrize(
    ("call", "extra", "exc"),
    [pytest.param(*case[1:4], id=case[0]) for case in BAD_CALLS[::4]],
)
def test_bad_input_raises_before_the_backend_runs(
    call: Call, extra: dict[str, Any], exc: type[Exception], plugins: Any
) -> None:
    recorder = FakeBackend("recorder")
    plugins(recorder=recorder)
    with pytest.raises(exc):
        run(call, backend="recorder", **extra)
    assert recorder.calls == []


def test_integer_array_likes_are_accepted_for_cu_seqlens() -> None:
    xps = pytest.importorskip("array_api_strict")
    want = run(_PACKED, output_final_state=True)
    cu = [int(c) for c in _CU]
    for given in (cu, tuple(cu), np.asarray(cu, dtype=np.int32), xps.asarray(cu)):
        got = run(_with(_PACKED, cu_seqlens=given), output_final_state=True)
        np.testing.assert_array_equal(to_numpy(got[0]), to_numpy(want[0]))


def test_mixed_namespaces_raise_type_error() -> None:
    xps = pytest.importorskip("array_api_strict")
    q, k, v, g, beta = (_A[n] for n in ("q", "k", "v", "g", "beta"))
    with pytest.raises(TypeError, match=r"\bk\b"):
        fastweights.gated_delta_rule(q, xps.asarray(k), v, g, beta)
    with pytest.raises(TypeError, match="initial_state"):
        fastweights.gated_delta_rule(q, k, v, g, beta, initial_state=xps.asarray(_STATE))


def test_unknown_backend_raises_type_error() -> None:
    with pytest.raises(TypeError, match="no-such-backend"):
        run(_GDR, backend="no-such-backend")


# -- decoding -------------------------------------------------------------------------------


def _step_args() -> tuple[Any, ...]:
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 2, 2, 4))
    v = rng.standard_normal((2, 2, 3))
    g = -rng.uniform(size=(2, 2))
    beta = rng.uniform(size=(2, 2))
    return q, k, v, g, beta


@pytest.mark.parametrize(
    "indices",
    [[0, 0], [0, 3], [-1, 0], [0], [0, 1, 2]],
    ids=["duplicate", "out of range", "negative", "too few", "too many"],
)
def test_bad_state_indices_raise_and_leave_the_pool(indices: list[int]) -> None:
    pool = np.arange(3 * 2 * 4 * 3, dtype=np.float64).reshape(3, 2, 4, 3)
    before = pool.copy()
    with pytest.raises(ValueError, match="state_indices"):
        fastweights.step.gated_delta_rule(*_step_args(), pool, state_indices=indices)
    np.testing.assert_array_equal(pool, before)


@pytest.mark.parametrize(
    ("pool", "exc"),
    [
        (np.zeros((2, 2, 4, 4)), ValueError),
        (np.zeros((2, 2, 4)), ValueError),
        (np.zeros((2, 2, 4, 3), dtype=np.int64), TypeError),
    ],
    ids=["V", "rank", "integer"],
)
def test_bad_state_pool_raises(pool: np.ndarray, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="state"):
        fastweights.step.gated_delta_rule(*_step_args(), pool)


def test_bad_step_shapes_raise() -> None:
    q, k, v, g, beta = _step_args()
    pool = np.zeros((2, 2, 4, 3))
    with pytest.raises(ValueError, match=r"\bk\b"):
        fastweights.step.gated_delta_rule(q, k[..., :3], v, g, beta, pool)
    with pytest.raises(ValueError, match=r"\bg\b"):
        fastweights.step.gated_delta_rule(q, k, v, np.abs(g) + 0.1, beta, pool)


# -- values are not checked ------------------------------------------------------------------


@pytest.mark.parametrize("op", ["linear_attn", "simple_gla", "gla", "delta_rule", "kda"])
def test_nan_inputs_propagate_without_crash(op: str) -> None:
    call = _call(op, initial_state=True)
    q = call.arrays["q"].copy()
    q[0, 3, 0, 0] = np.nan
    call = _with(call, q=q)
    for backend, form in engines(call):
        o, _ = run(call, backend, form, output_final_state=True)
        o = to_numpy(o)
        assert np.isnan(o[0, 3, 0]).any(), f"{backend}/{form}"
        assert np.all(np.isfinite(o[1])), f"{backend}/{form}: NaN leaked to another sequence"


def test_nan_gate_passes_the_sign_check() -> None:
    g = _A["g"].copy()
    g[1, 2, 1] = np.nan
    call = _with(_GDR, g=g)
    for backend, form in engines(call):
        o, _ = run(call, backend, form)
        o = to_numpy(o)
        assert np.isnan(o[1, 2:, 1]).all(), f"{backend}/{form}"
        assert np.all(np.isfinite(o[0])), f"{backend}/{form}"


# Inf times 0 inside the delta rule's solve is NaN, and NumPy says so with a RuntimeWarning, as
# for any NumPy computation on non-finite input: the values propagate, nothing crashes.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("op", ["linear_attn", "simple_gla", "delta_rule", "gated_delta_rule"])
def test_inf_inputs_propagate_without_crash(op: str) -> None:
    call = _call(op, initial_state=True)
    v = call.arrays["v"].copy()
    v[1, 2, 0, 0] = np.inf
    call = _with(call, v=v)
    for backend, form in engines(call):
        o, _ = run(call, backend, form, output_final_state=True)
        o = to_numpy(o)
        assert not np.all(np.isfinite(o[1, 2:, 0])), f"{backend}/{form}"
        assert np.all(np.isfinite(o[0])), f"{backend}/{form}: Inf leaked to another sequence"
