"""Gradients of the primer rules (``mesa_net``, ``recurrent_delta_rule``, ``srwm``) on the
reference backend against central finite differences of the public ops, in float64.

Each check draws one random direction per argument and compares ``<grad, direction>`` with the
derivative of ``L = sum(o * do) + sum(final * dstate)`` along it (central differences; a
log-decay gate, which must stay ``<= 0``, is moved only downwards, with the one-sided
second-order difference, and not at all where it is ``-inf``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np
import pytest

import fastweights
from fastweights._validate import validate

H_STEP = 1e-5
RTOL = 1e-7
CG_STEPS = 3
"""CG steps of the finite-difference checks (K = 4). Once CG has converged (K steps), its
``1e-5`` terms bend the map on a scale of ``1e-5``, where central differences with
``H_STEP = 1e-5`` are off by ~1e-5 relative (they converge to the gradient as h^2 below it);
before, the map is smooth on the scale of the step."""


def _family(op: str) -> Any:
    family = {"mesa_net": "mesa", "recurrent_delta_rule": "recurrent_delta", "srwm": "srwm"}[op]
    return importlib.import_module(f"fastweights.rules.{family}")


def _dot(a: Any, b: Any) -> float:
    if isinstance(a, tuple):
        return sum(_dot(x, y) for x, y in zip(a, b, strict=True))
    return float(np.sum(np.asarray(a) * np.asarray(b)))


def _flat(x: Any) -> tuple[Any, ...]:
    return x if isinstance(x, tuple) else (x,)


def _map(f: Any, *xs: Any) -> Any:
    if isinstance(xs[0], tuple):
        return tuple(_map(f, *parts) for parts in zip(*xs, strict=True))
    return f(*xs)


def _vjp(op: str, args: dict[str, Any], kw: dict[str, Any], do, dstate, form: str, every):
    call = validate(op, **args, **kw, form=form, output_final_state=True)
    if every is not None:  # the checkpoint interval of the ops that take no chunk_size
        call = dataclasses.replace(call, chunk_size=every)
    return _family(op).vjp(call, form, do, dstate)


def check(
    op: str,
    args: dict[str, Any],
    *,
    gate: str | None = None,
    form: str = "recurrent",
    every: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> dict[str, Any]:
    """Compare the family's ``vjp`` with finite differences of ``op``; returns the gradients."""
    rng = np.random.default_rng(seed)
    fn = getattr(fastweights, op)

    def loss(values: dict[str, Any]) -> float:
        o, final = fn(**values, **kw, form=form, output_final_state=True, backend="reference")
        return _dot(o, do) + _dot(final, dstate)

    o, final = fn(**args, **kw, form=form, output_final_state=True, backend="reference")
    do = rng.standard_normal(o.shape)
    dstate = _map(lambda s: rng.standard_normal(s.shape), final)
    grads = _vjp(op, args, kw, do, dstate, form, every)
    expected = set(args) - {"initial_state"} | (
        {"initial_state"} if "initial_state" in args else set()
    )
    assert set(grads) == expected
    for name, x in args.items():
        for got, arg in zip(_flat(grads[name]), _flat(x), strict=True):
            assert (got.shape, got.dtype) == (arg.shape, np.float64), name
        direction = _map(lambda a: rng.standard_normal(a.shape), x)
        if name == gate:
            direction = np.where(np.isneginf(x), 0.0, -np.abs(direction))

        def at(step: float, name: str = name, x: Any = x, direction: Any = direction) -> float:
            moved = _map(lambda a, d: a + step * d, x, direction)
            return loss({**args, name: moved})

        if name == gate:  # one-sided: the gate stays <= 0
            numeric = (-3 * loss(args) + 4 * at(H_STEP) - at(2 * H_STEP)) / (2 * H_STEP)
        else:
            numeric = (at(H_STEP) - at(-H_STEP)) / (2 * H_STEP)
        analytic = _dot(grads[name], direction)
        scale = max(1.0, abs(numeric))
        assert abs(analytic - numeric) <= RTOL * scale, (name, analytic, numeric)
    if gate is not None:
        assert np.all(grads[gate][np.isneginf(args[gate])] == 0)
    return grads


# --- mesa_net ---------------------------------------------------------------------------


def _mesa(rng: np.random.Generator, B=1, T=7, H=2, G=1, K=4, V=3, state=True, N=None):
    q, k = rng.standard_normal((2, B, T, H, K))
    HV = G * H
    args = {
        "q": q,
        "k": k,
        "v": rng.standard_normal((B, T, HV, V)),
        "g": -rng.random((B, T, HV)),
        "beta": rng.random((B, T, HV)),
        "lamb": 0.5 + rng.random((HV, K)),
    }
    if state:
        N = B if N is None else N
        kk = rng.standard_normal((N, HV, 6, K))
        H0 = 0.3 * np.einsum("nhsi,nhsj->nhij", kk, kk)
        args["initial_state"] = (H0, rng.standard_normal((N, HV, K, V)))
    return args


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_mesa_net_initial_state(solver):
    args = _mesa(np.random.default_rng(1))
    check("mesa_net", args, gate="g", solver=solver, max_cg_iterations=CG_STEPS, chunk_size=3)


def test_mesa_net_l2norm_grouped_heads_chunk_form():
    args = _mesa(np.random.default_rng(2), B=2, G=2)
    check("mesa_net", args, gate="g", form="chunk", use_qk_l2norm=True, scale=0.7, chunk_size=4)


def test_mesa_net_cg_l2norm_no_state():
    args = _mesa(np.random.default_rng(3), G=2, state=False)
    check("mesa_net", args, gate="g", solver="cg", max_cg_iterations=CG_STEPS, use_qk_l2norm=True)


@pytest.mark.parametrize(("form", "solver"), [("recurrent", "exact"), ("chunk", "cg")])
def test_mesa_net_gates_zero_and_minus_inf(form, solver):
    args = _mesa(np.random.default_rng(4), T=8)
    args["g"][0, [1, 4], 0] = 0.0
    args["g"][0, 2, 1] = 0.0
    args["g"][0, 5, 1] = -np.inf
    check(
        "mesa_net",
        args,
        gate="g",
        form=form,
        solver=solver,
        max_cg_iterations=CG_STEPS,
        chunk_size=3,
    )


def test_mesa_net_packed_with_an_empty_sequence():
    rng = np.random.default_rng(5)
    cu = np.array([0, 3, 3, 8])
    args = _mesa(rng, T=8, G=2, N=3)
    grads = check("mesa_net", args, gate="g", cu_seqlens=cu, chunk_size=2, use_qk_l2norm=True)
    # the empty sequence's initial-state gradient is its row of dstate: checked by the
    # finite differences above; here its exact pass-through
    call = validate("mesa_net", **args, cu_seqlens=cu, output_final_state=True)
    dstate = (rng.standard_normal((3, 4, 4, 4)), rng.standard_normal((3, 4, 4, 3)))
    do = np.zeros((1, 8, 4, 3))
    d = fastweights.rules.mesa.vjp(call, "recurrent", do, dstate)
    assert np.array_equal(d["initial_state"][0][1], dstate[0][1])
    assert np.array_equal(d["initial_state"][1][1], dstate[1][1])
    assert grads["q"].shape == args["q"].shape


# --- recurrent_delta_rule ---------------------------------------------------------------


def _rdn(rng: np.random.Generator, B=1, T=6, H=2, K=4, V=3, state=True, N=None):
    q, k = rng.standard_normal((2, B, T, H, K))
    args = {
        "q": q,
        "k": k,
        "v": rng.standard_normal((B, T, H, V)),
        "beta": rng.standard_normal((B, T, H)),
        "R_q": 0.5 * rng.standard_normal((H, K, V)),
        "R_k": 0.5 * rng.standard_normal((H, K, V)),
        "R_v": 0.5 * rng.standard_normal((H, V, V)),
        "r_beta": 0.5 * rng.standard_normal((H, V)),
    }
    if state:
        N = B if N is None else N
        args["initial_state"] = (
            rng.standard_normal((N, H, K, V)),
            rng.standard_normal((N, H, V)),
        )
    return args


def test_recurrent_delta_rule_initial_state():
    args = _rdn(np.random.default_rng(11), B=2)
    check("recurrent_delta_rule", args, scale=0.8, every=4)


def test_recurrent_delta_rule_no_state_one_chunk():
    check("recurrent_delta_rule", _rdn(np.random.default_rng(12), state=False))


def test_recurrent_delta_rule_packed_with_an_empty_sequence():
    cu = np.array([0, 4, 4, 9])
    args = _rdn(np.random.default_rng(13), T=9, N=3)
    check("recurrent_delta_rule", args, cu_seqlens=cu, every=2)


# --- srwm -------------------------------------------------------------------------------


def _srwm(rng: np.random.Generator, B=1, T=6, H=2, D=3, V=2, state=False, N=None):
    args = {
        "x": rng.standard_normal((B, T, H, D)),
        "W0": rng.standard_normal((H, D, V + 2 * D + 4)),
    }
    if state:
        N = B if N is None else N
        args["initial_state"] = rng.standard_normal((N, H, D, V + 2 * D + 4))
    return args


def test_srwm_shared_initial_weight():
    check("srwm", _srwm(np.random.default_rng(21), B=2), every=4)


def test_srwm_initial_state():
    grads = check("srwm", _srwm(np.random.default_rng(22), state=True), every=2)
    assert not np.any(grads["W0"])


def test_srwm_packed_with_an_empty_sequence():
    cu = np.array([0, 5, 5, 9])
    check("srwm", _srwm(np.random.default_rng(23), T=9, N=3, state=True), cu_seqlens=cu, every=3)
    check("srwm", _srwm(np.random.default_rng(24), T=9), cu_seqlens=cu, every=3)


# --- through fastweights.vjp, and on array-api-strict ----------------------------------

CASES = {
    "mesa_net": lambda rng: (_mesa(rng, G=2), {"use_qk_l2norm": True, "chunk_size": 3}),
    "mesa_net_cg": lambda rng: (_mesa(rng), {"solver": "cg", "max_cg_iterations": 6}),
    "recurrent_delta_rule": lambda rng: (_rdn(rng), {"scale": 0.9}),
    "srwm": lambda rng: (_srwm(rng, B=2), {}),
}


def _pullback(op: str, args: dict[str, Any], kw: dict[str, Any], do: Any, dstate: Any):
    o, final, pullback = fastweights.vjp(getattr(fastweights, op), **args, **kw)
    return o, final, pullback(do, dstate)


@pytest.mark.parametrize("case", sorted(CASES))
def test_public_vjp_is_the_family_vjp(case):
    rng = np.random.default_rng(31)
    args, kw = CASES[case](rng)
    op = case.removesuffix("_cg")
    o, final = getattr(fastweights, op)(**args, **kw, output_final_state=True)
    do = rng.standard_normal(o.shape)
    dstate = _map(lambda s: rng.standard_normal(s.shape), final)
    _, _, grads = _pullback(op, args, kw, do, dstate)
    call = validate(op, **args, **kw, output_final_state=True)
    form = _family(op).auto_form(call)[0]
    expected = _family(op).vjp(call, form, do, dstate)
    assert set(grads) == set(expected)
    for name in grads:
        for got, want in zip(_flat(grads[name]), _flat(expected[name]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # float32 inputs: float32 gradients, close to the float64 ones
    args32 = {n: _map(lambda a: a.astype(np.float32), x) for n, x in args.items()}
    do32, dstate32 = do.astype(np.float32), _map(lambda a: a.astype(np.float32), dstate)
    _, _, grads32 = _pullback(op, args32, kw, do32, dstate32)
    for name in grads:
        for got, want in zip(_flat(grads32[name]), _flat(grads[name]), strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_array_api_strict(case):
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(41)
    args, kw = CASES[case](rng)
    op = case.removesuffix("_cg")
    o, final = getattr(fastweights, op)(**args, **kw, output_final_state=True)
    do = rng.standard_normal(o.shape)
    dstate = _map(lambda s: rng.standard_normal(s.shape), final)
    _, _, want = _pullback(op, args, kw, do, dstate)
    to = lambda a: xps.asarray(a)  # noqa: E731
    strict = {n: _map(to, x) for n, x in args.items()}
    o_s, _, got = _pullback(op, strict, kw, to(do), _map(to, dstate))
    assert type(o_s) is type(to(do))
    for name in want:
        for g, w in zip(_flat(got[name]), _flat(want[name]), strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_dstate_is_a_zero_dstate(case):
    rng = np.random.default_rng(51)
    args, kw = CASES[case](rng)
    op = case.removesuffix("_cg")
    call = validate(op, **args, **kw, output_final_state=True)
    o, final = _family(op).run(call, "recurrent")
    do = rng.standard_normal(o.shape)
    none = _family(op).vjp(call, "recurrent", do, None)
    zero = _family(op).vjp(call, "recurrent", do, _map(np.zeros_like, final))
    for name in none:
        for a, b in zip(_flat(none[name]), _flat(zero[name]), strict=True):
            assert np.array_equal(a, b), name
