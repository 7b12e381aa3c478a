"""Gradients of :func:`fastweights.vjp` (issue 13, item 4).

- Every golden2 ``vjp_*`` case through every form of every backend that has a gradient
  (``vjp`` in the backend protocol): float64 to 1e-10 relative RMS per gradient, float32
  inputs to 2e-4. A form that cannot take a case declines it with ``ValueError``. Backends
  without a gradient run the forward and the reference computes the gradient (the fallback).
- Finite differences in float64 on random small cases for every op (hypothesis): a random
  direction through every floating input at once, a central difference against
  ``sum(grad * direction)``; packed sequences with empty ones, grouped value heads,
  ``use_qk_l2norm``, initial states, small chunk sizes (several chunks in a few tokens).
- The pullback's contract: shapes and dtypes, ``dstate=None`` means zeros, it can be called
  twice, it modifies nothing, it checks its cotangents; ``vjp`` refuses serving arguments;
  a ``-inf`` gate has gradient 0 and the rest stays finite.
- The memory model: the reference pullback keeps chunk-boundary states, not a state per token.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from importlib import resources
from typing import Any

import numpy as np
import pytest
from _support import available_backends, implemented_as, namespace, numpy_backends
from hypothesis import given
from hypothesis import strategies as st

import fastweights
from fastweights.backends import RULES, get_backend
from fastweights.testing import Call, random_call, relative_rms, to_namespace, to_numpy

#: Relative RMS tolerance of every gradient, by input dtype (issue 13, golden2 README).
GRAD_TOL = {"float64": 1e-10, "float32": 2e-4}


def _has_gradient(name: str) -> bool:
    return getattr(get_backend(name), "vjp", None) is not None


#: Available backends with a gradient entry point, and those whose gradients fall back to the
#: reference (only NumPy backends for the fallback: it is the same reference sweep).
GRADIENT_BACKENDS = [b.name for b in available_backends() if _has_gradient(b.name)]
FALLBACK_BACKENDS = [b.name for b in numpy_backends() if not _has_gradient(b.name)]


# --- golden2 vjp_* cases ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VjpCase:
    """A golden ``vjp_*`` case: the call, its cotangents and the expected results."""

    name: str
    call: Call
    w_o: np.ndarray
    w_s: np.ndarray
    o: np.ndarray
    final_state: np.ndarray
    grads: dict[str, np.ndarray]


def load_vjp_cases() -> list[VjpCase]:
    root = resources.files("fastweights.testing").joinpath("golden2")
    manifest = json.loads(root.joinpath("manifest.json").read_text())
    cases = []
    for entry in manifest:
        if entry.get("kind") != "vjp":
            continue
        with root.joinpath(f"{entry['name']}.npz").open("rb") as fh, np.load(fh) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {n: np.array(data[n]) for n in meta["inputs"]}
            grads = {
                n.removeprefix("grad_"): np.array(data[n])
                for n in meta["outputs"]
                if n.startswith("grad_")
            }
            w_o, w_s = (np.array(data[n]) for n in meta["cotangents"])
            cases.append(
                VjpCase(
                    name=entry["name"],
                    call=Call(meta["op"], arrays, dict(meta["kwargs"])),
                    w_o=w_o,
                    w_s=w_s,
                    o=np.array(data["o"]),
                    final_state=np.array(data["final_state"]),
                    grads=grads,
                )
            )
    return cases


VJP_CASES = load_vjp_cases()


def _golden_params(backends: list[str], *, all_forms: bool) -> list[Any]:
    out = []
    for case in VJP_CASES:
        for name in backends:
            offered = get_backend(name).ops.get(implemented_as(case.call.op))
            if offered is None:
                continue
            forms = (*offered, "auto") if all_forms else ("auto",)
            for form in forms:
                out.append(pytest.param(case, name, form, id=f"{case.name}-{name}-{form}"))
    return out


def test_golden_vjp_cases_are_loaded() -> None:
    assert len(VJP_CASES) == 10
    assert {c.call.op for c in VJP_CASES} == {
        "linear_attn",
        "simple_gla",
        "gla",
        "delta_rule",
        "gated_delta_rule",
        "kda",
        "delta_product",
    }
    assert "reference" in GRADIENT_BACKENDS


def _run_golden(case: VjpCase, backend: str, form: str, dtype: str) -> None:
    call = case.call.cast(np.dtype(dtype))
    xp = namespace(backend)
    args, kwargs = call.arguments(xp)
    unavailable = case.call.unavailable_form(form) if form != "auto" else None
    if unavailable:
        with pytest.raises(ValueError):
            fastweights.vjp(call.op, *args, backend=backend, form=form, **kwargs)
        return
    o, final, pullback = fastweights.vjp(call.op, *args, backend=backend, form=form, **kwargs)
    w_o = to_namespace(case.w_o.astype(dtype), xp)
    w_s = to_namespace(case.w_s.astype(dtype), xp)
    grads = pullback(w_o, w_s)
    assert sorted(grads) == sorted(case.grads)
    tol = GRAD_TOL[dtype]
    errors = {"o": relative_rms(o, case.o), "final_state": relative_rms(final, case.final_state)}
    for name, want in case.grads.items():
        got = to_numpy(grads[name])
        assert got.shape == want.shape, name
        assert got.dtype == np.dtype(dtype), name
        errors[f"grad_{name}"] = relative_rms(got, want)
    bad = {n: e for n, e in errors.items() if not e <= tol}
    worst = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    assert not bad, f"{case.name} {backend} {form} {dtype}: over {tol:g}: {bad} (all: {worst})"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("case", "backend", "form"), _golden_params(GRADIENT_BACKENDS, all_forms=True)
)
def test_golden_vjp(case: VjpCase, backend: str, form: str, dtype: str) -> None:
    _run_golden(case, backend, form, dtype)


def _fallback_params() -> list[Any]:
    out = _golden_params(FALLBACK_BACKENDS, all_forms=False)
    # Other namespaces: dask builds a graph per call (3 s for this case, 10 s for the gva one).
    others = [b.name for b in available_backends() if b.name in ("dask", "cupy")]
    for p in _golden_params([b for b in others if not _has_gradient(b)], all_forms=False):
        if p.values[0].name == "vjp_gated_delta_rule_varlen":
            out.append(pytest.param(*p.values, id=p.id, marks=[pytest.mark.slow]))
    return out


@pytest.mark.parametrize(("case", "backend", "form"), _fallback_params())
def test_golden_vjp_fallback_to_reference(case: VjpCase, backend: str, form: str) -> None:
    # A backend without gradients runs the forward; the reference sweeps the form it ran.
    args, kwargs = case.call.arguments(namespace(backend))
    plan = fastweights.plan(getattr(fastweights, case.call.op), *args, backend=backend, **kwargs)
    assert plan.backend == backend
    assert plan.gradient.startswith("reference ("), plan.gradient
    _run_golden(case, backend, form, "float64")


#: Ops whose gradients the numba backend computes itself (issue 13, item 2: the first wave
#: and the DPLR family; the primer's rules may fall back to the reference).
NUMBA_GRADIENT_OPS = [
    pytest.param(
        op,
        marks=pytest.mark.xfail(
            strict=True, reason="issue 13: the DPLR family has no numba gradient kernel yet"
        ),
    )
    if RULES[op].family == "dplr"
    else op
    for op in RULES
    if op not in ("mesa_net", "recurrent_delta_rule", "srwm")
]


@pytest.mark.parametrize("op", NUMBA_GRADIENT_OPS)
def test_numba_computes_its_own_gradients(op: str) -> None:
    if "numba" not in [b.name for b in available_backends()]:
        pytest.skip("numba is not installed")
    call = random_call(op, batch=1, length=4, key_dim=4, value_dim=3)
    args, kwargs = call.arguments()
    plan = fastweights.plan(getattr(fastweights, op), *args, backend="numba", **kwargs)
    assert plan.backend == "numba"
    assert plan.gradient == "numba", plan.gradient


@pytest.mark.parametrize("backend", GRADIENT_BACKENDS)
def test_plan_names_the_gradient_backend(backend: str) -> None:
    call = random_call("gated_delta_rule", batch=1, length=4, key_dim=4, value_dim=3)
    args, kwargs = call.arguments(namespace(backend))
    plan = fastweights.plan(fastweights.gated_delta_rule, *args, backend=backend, **kwargs)
    assert plan.gradient == backend


# --- finite differences ----------------------------------------------------------------------


def _leaves(x: Any) -> list[Any]:
    return list(x) if isinstance(x, tuple | list) else [x]


def _floating(call: Call) -> dict[str, Any]:
    """The call's differentiable arrays (every floating input given)."""
    return {n: x for n, x in call.arrays.items() if x is not None and n != "cu_seqlens"}


def _loss(
    call: Call, backend: str, form: str, w_o: np.ndarray, w_s: list[np.ndarray], extra: dict
) -> float:
    o, final = call.run(
        getattr(fastweights, call.op), backend=backend, form=form, output_final_state=True, **extra
    )
    total = float(np.sum(to_numpy(o) * w_o))
    for s, w in zip(_leaves(final), w_s, strict=True):
        total += float(np.sum(to_numpy(s) * w))
    return total


def _direction(rng: np.random.Generator, call: Call) -> dict[str, Any]:
    """A random direction for every floating input. It is zero where a log-decay is (about)
    0 or ``-inf`` (a step up would leave the domain; ``-inf`` has no neighbourhood), and symmetric
    for MesaNet's ``H`` (a Gram matrix the solve may read one triangle of)."""
    rule = RULES[call.op]
    gates = {a.name for a in rule.args if a.log_decay}
    layout = rule.state_layout(normalize=bool(call.kwargs.get("normalize")))
    out: dict[str, Any] = {}
    for name, x in _floating(call).items():
        if name == "initial_state":
            parts = []
            for part, s in zip(layout, _leaves(x), strict=True):
                d = rng.standard_normal(s.shape)
                if part.sample == "gram":
                    d = (d + np.swapaxes(d, -1, -2)) / 2
                parts.append(d)
            out[name] = tuple(parts) if isinstance(x, tuple) else parts[0]
            continue
        d = rng.standard_normal(x.shape)
        if name in gates:
            d = np.where(x < -1e-4, d, 0.0) * np.isfinite(x)
        if call.kwargs.get("normalize") and name in ("q", "k"):
            d = d * 0.1  # normalize=True keeps q, k positive (the denominator away from 0)
        out[name] = d
    return out


def _shifted(call: Call, direction: dict[str, Any], h: float, only: str | None = None) -> Call:
    arrays = dict(call.arrays)
    for name, d in direction.items():
        if only is not None and name != only:
            continue
        x = arrays[name]
        if isinstance(x, tuple):
            arrays[name] = tuple(a + h * b for a, b in zip(x, d, strict=True))
        else:
            arrays[name] = x + h * d
    return dataclasses.replace(call, arrays=arrays)


def _dot(grad: Any, d: Any) -> float:
    return sum(
        float(np.sum(to_numpy(g) * e)) for g, e in zip(_leaves(grad), _leaves(d), strict=True)
    )


def check_finite_differences(
    call: Call, backend: str, form: str, seed: int, extra: dict | None = None
) -> dict[str, Any]:
    """Compare ``pullback`` with a central difference along a random direction; returns the
    gradients. On a mismatch, the difference along each input alone names the wrong one."""
    extra = dict(extra or {})
    rng = np.random.default_rng(seed)
    args, kwargs = call.arguments()
    o, final, pullback = fastweights.vjp(
        call.op, *args, backend=backend, form=form, **kwargs, **extra
    )
    w_o = rng.standard_normal(o.shape)
    w_s = [rng.standard_normal(s.shape) for s in _leaves(final)]
    dstate = tuple(w_s) if isinstance(final, tuple) else w_s[0]
    grads = pullback(w_o, dstate)
    assert sorted(grads) == sorted(_floating(call))
    for name, x in _floating(call).items():
        for g, a in zip(_leaves(grads[name]), _leaves(x), strict=True):
            assert g.shape == a.shape and g.dtype == a.dtype, name
            assert np.all(np.isfinite(g)), name
    direction = _direction(rng, call)
    h = 1e-6

    def central(only: str | None = None) -> float:
        up = _loss(_shifted(call, direction, h, only), backend, form, w_o, w_s, extra)
        down = _loss(_shifted(call, direction, -h, only), backend, form, w_o, w_s, extra)
        return (up - down) / (2 * h)

    analytic = {n: _dot(grads[n], d) for n, d in direction.items()}
    size = sum(
        float(np.sum(np.abs(to_numpy(g) * e)))
        for n, d in direction.items()
        for g, e in zip(_leaves(grads[n]), _leaves(d), strict=True)
    )
    numeric = central()
    if abs(numeric - sum(analytic.values())) > 1e-6 * size + 1e-9:
        wrong = {}
        for n in direction:
            fd = central(n)
            if abs(fd - analytic[n]) > 1e-6 * abs(fd) + 1e-7:
                wrong[n] = (analytic[n], fd)
        pytest.fail(
            f"{call.op} {backend} {form} {call.kwargs} {extra}: directional derivative "
            f"{sum(analytic.values())!r} from the pullback, {numeric!r} by finite differences; "
            f"wrong (pullback, finite difference): {wrong}"
        )
    return grads


def _fd_params() -> list[Any]:
    out = []
    for op in RULES:
        for backend in GRADIENT_BACKENDS:
            offered = get_backend(backend).ops.get(implemented_as(op))
            if offered is None or backend in ("dask", "cupy"):  # NumPy arrays here
                continue
            for form in offered:
                marks = [] if backend == "reference" else [pytest.mark.slow]
                out.append(
                    pytest.param(op, backend, form, id=f"{op}-{backend}-{form}", marks=marks)
                )
    return out


@st.composite
def small_calls(draw: st.DrawFn, op: str, form: str) -> tuple[Call, dict[str, Any]]:
    """A small random call of ``op`` that ``form`` takes, and the chunk size to run it with."""
    rule = RULES[op]
    packed = form != "parallel" and "cu_seqlens" in rule.common and draw(st.booleans())
    seqlens = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)) if packed else None
    if seqlens is not None and draw(st.booleans()):
        seqlens.insert(draw(st.integers(0, len(seqlens))), 0)  # an empty sequence
    per_value = (
        form == "recurrent"
        and any(a.alternatives for a in rule.args)
        and draw(st.integers(0, 3)) == 0
    )
    normalize = "normalize" in rule.option_names and draw(st.booleans())
    l2norm = "use_qk_l2norm" in rule.common and not normalize and draw(st.booleans())
    key_dim = draw(st.integers(2, 5))
    # "none" leaves out an optional gate; Call.arguments passes positionals only when given.
    gates = ["normal", "strong"]
    if not any(a.log_decay and a.name in rule.positional for a in rule.args):
        gates.append("none")
    call = random_call(
        op,
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 2)),
        length=draw(st.integers(1, 6)),
        heads=draw(st.integers(1, 2)),
        groups=draw(st.integers(1, 2)),
        key_dim=key_dim,
        value_dim=draw(st.integers(1, 4)),
        num_householder=draw(st.integers(1, 3)),
        seqlens=seqlens,
        initial_state=draw(st.booleans()),
        gates=draw(st.sampled_from(gates)),
        beta_per_value=per_value,
        normalize=normalize,
        use_qk_l2norm=l2norm,
        scale=draw(st.sampled_from([None, 0.7])) if "scale" in rule.common else None,
    )
    if "solver" in rule.option_names:
        solver = draw(st.sampled_from(["exact", "cg"]))
        kwargs = {"solver": solver, **({"max_cg_iterations": 3} if solver == "cg" else {})}
        call = dataclasses.replace(call, kwargs={**call.kwargs, **kwargs})
    extra = {}
    if "chunk_size" in rule.common:
        extra["chunk_size"] = draw(st.sampled_from([1, 2, 3, 64]))
    return call, extra


@pytest.mark.parametrize(("op", "backend", "form"), _fd_params())
@given(data=st.data())
def test_finite_differences(op: str, backend: str, form: str, data: st.DataObject) -> None:
    call, extra = data.draw(small_calls(op, form))
    seed = data.draw(st.integers(0, 2**31 - 1))
    check_finite_differences(call, backend, form, seed, extra)


# --- -inf gates --------------------------------------------------------------------------------

GATED = [op for op, rule in RULES.items() if any(a.log_decay for a in rule.args)]


@pytest.mark.parametrize(
    ("op", "backend", "form"), [p for p in _fd_params() if p.values[0] in GATED]
)
def test_minus_inf_gate_has_zero_gradient(op: str, backend: str, form: str) -> None:
    call = random_call(
        op, batch=2, length=9, key_dim=4, value_dim=3, gates="reset", seqlens=None, seed=3
    )
    gate = next(a.name for a in RULES[op].args if a.log_decay)
    g = np.array(call.arrays[gate])
    g[0, 2] = -np.inf  # every head (and channel) of token 2 of the first sequence
    g[1, 5, 0] = -np.inf
    call = dataclasses.replace(call, arrays={**call.arrays, gate: g})
    grads = check_finite_differences(call, backend, form, seed=5, extra={"chunk_size": 4})
    for name, grad in grads.items():
        assert all(np.all(np.isfinite(x)) for x in _leaves(grad)), name
    assert np.all(grads[gate][np.isneginf(g)] == 0)


# --- the pullback's contract -------------------------------------------------------------------


def _example(op: str, dtype: Any = np.float64, **options: Any) -> Call:
    call = random_call(op, batch=2, length=5, key_dim=4, value_dim=3, **options)
    return call.cast(np.dtype(dtype))


@pytest.mark.parametrize("op", list(RULES))
def test_float32_gradients_have_the_inputs_shapes_and_dtypes(op: str) -> None:
    call = _example(op, np.float32)
    args, kwargs = call.arguments()
    o, final, pullback = fastweights.vjp(getattr(fastweights, op), *args, **kwargs)
    assert o.dtype == np.float32
    dstate = tuple(np.ones_like(s) for s in final) if isinstance(final, tuple) else None
    grads = pullback(np.ones_like(o), dstate)
    assert sorted(grads) == sorted(_floating(call))
    for name, x in _floating(call).items():
        for g, a in zip(_leaves(grads[name]), _leaves(x), strict=True):
            assert isinstance(g, np.ndarray), name
            assert (g.shape, g.dtype) == (a.shape, a.dtype), name
            assert np.all(np.isfinite(g)), name


@pytest.mark.parametrize("op", list(RULES))
def test_pullback_is_pure(op: str) -> None:
    # dstate=None equals zeros, a second call gives the same, nothing given is modified.
    call = _example(op)
    args, kwargs = call.arguments()
    before = {n: tuple(np.copy(a) for a in _leaves(x)) for n, x in _floating(call).items()}
    o, final, pullback = fastweights.vjp(op, *args, **kwargs)
    rng = np.random.default_rng(1)
    do = rng.standard_normal(o.shape)
    do_copy = do.copy()
    first = pullback(do)
    zeros = tuple(np.zeros_like(s) for s in final) if isinstance(final, tuple) else None
    second = pullback(do, zeros if zeros is not None else np.zeros_like(final))
    third = pullback(do)
    assert np.array_equal(do, do_copy)
    for name in first:
        parts = (_leaves(first[name]), _leaves(second[name]), _leaves(third[name]))
        for a, b, c in zip(*parts, strict=True):
            assert np.array_equal(a, b), name
            assert np.array_equal(a, c), name
    for name, x in _floating(call).items():
        for a, b in zip(_leaves(x), before[name], strict=True):
            assert np.array_equal(a, b), name
    # A gradient is a fresh array: writing into it changes neither the inputs nor later calls.
    for name in first:
        for a in _leaves(first[name]):
            a[...] = 7.0
    again = pullback(do)
    for name in again:
        for a, b in zip(_leaves(again[name]), _leaves(third[name]), strict=True):
            assert np.array_equal(a, b), name


def _gdn() -> tuple[Any, Any, Any]:
    call = _example("gated_delta_rule")
    args, kwargs = call.arguments()
    return fastweights.vjp(fastweights.gated_delta_rule, *args, **kwargs)


@pytest.mark.parametrize(
    ("do", "dstate", "error", "name"),
    [
        pytest.param(lambda o, s: o[:, :-1], None, ValueError, "do", id="do-shape"),
        pytest.param(lambda o, s: o.astype(np.int64), None, TypeError, "do", id="do-int"),
        pytest.param(lambda o, s: o.tolist(), None, TypeError, "do", id="do-list"),
        pytest.param(lambda o, s: o, lambda o, s: s[:, :, :-1], ValueError, "dstate", id="ds"),
        pytest.param(
            lambda o, s: o, lambda o, s: s.astype(np.int32), TypeError, "dstate", id="ds-int"
        ),
        pytest.param(lambda o, s: o, lambda o, s: (s, s), TypeError, "dstate", id="dstate-pair"),
    ],
)
def test_pullback_checks_its_cotangents(do: Any, dstate: Any, error: type, name: str) -> None:
    o, final, pullback = _gdn()
    with pytest.raises(error, match=name):
        pullback(do(o, final), None if dstate is None else dstate(o, final))


def test_pullback_checks_a_pair_state_cotangent() -> None:
    call = _example("mesa_net")
    args, kwargs = call.arguments()
    o, (h, g), pullback = fastweights.vjp("mesa_net", *args, **kwargs)
    with pytest.raises(TypeError, match="dstate"):
        pullback(o, g)
    with pytest.raises(ValueError, match=r"dstate\[1\]"):
        pullback(o, (h, h))


def test_vjp_refuses_serving_arguments_and_unknown_ops() -> None:
    call = _example("gated_delta_rule", initial_state=False)
    args, kwargs = call.arguments()
    pool = np.zeros((4, 2, 4, 3))
    with pytest.raises(ValueError, match="state_pool"):
        fastweights.vjp(
            "gated_delta_rule", *args, state_pool=pool, state_indices=np.array([0, 1]), **kwargs
        )
    with pytest.raises(ValueError, match="output_state_snapshots"):
        fastweights.vjp("gated_delta_rule", *args, output_state_snapshots=True, **kwargs)
    with pytest.raises(TypeError, match="op"):
        fastweights.vjp(np.sum, *args, **kwargs)
    with pytest.raises(TypeError, match="op"):
        fastweights.vjp("no_such_op", *args, **kwargs)


def test_empty_packed_sequence_passes_dstate_to_its_initial_state() -> None:
    call = random_call("gated_delta_rule", seqlens=[3, 0, 4], key_dim=4, value_dim=3)
    args, kwargs = call.arguments()
    o, final, pullback = fastweights.vjp("gated_delta_rule", *args, **kwargs)
    dstate = np.random.default_rng(2).standard_normal(final.shape)
    before = dstate.copy()
    grads = pullback(np.zeros_like(o), dstate)
    assert np.array_equal(grads["initial_state"][1], dstate[1])
    grads["initial_state"][...] = 0.0  # a new array, not a view of dstate
    assert np.array_equal(dstate, before)


def test_other_namespaces() -> None:
    xp = pytest.importorskip("array_api_strict")
    call = _example("gated_delta_rule", use_qk_l2norm=True, groups=2)
    args, kwargs = call.arguments(xp)
    o, final, pullback = fastweights.vjp("gated_delta_rule", *args, **kwargs)
    grads = pullback(xp.ones_like(o), xp.ones_like(final))
    np_args, np_kwargs = call.arguments()
    _, _, np_pullback = fastweights.vjp("gated_delta_rule", *np_args, **np_kwargs)
    want = np_pullback(np.ones(o.shape), np.ones(final.shape))
    for name, g in grads.items():
        assert type(g) is type(o), name
        assert relative_rms(to_numpy(g), want[name]) < 1e-13, name


# --- memory ------------------------------------------------------------------------------------


def _pullback_peak(op: str, form: str, t: int, kd: int, vd: int) -> int:
    call = random_call(
        op, batch=1, length=t, heads=1, key_dim=kd, value_dim=vd, seed=4, initial_state=False
    )
    args, kwargs = call.arguments()
    o, _, pullback = fastweights.vjp(op, *args, backend="reference", form=form, **kwargs)
    do = np.ones_like(o)
    tracemalloc.start()
    try:
        pullback(do)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("op", ["gated_delta_rule", "kda", "dplr"])
def test_pullback_keeps_no_state_per_token(op: str, form: str) -> None:
    # The memory model: inputs and the states at chunk boundaries, recomputed per chunk. A
    # state per token costs T * K * V * 8 bytes; the peak of the pullback (NumPy reports its
    # allocations to tracemalloc) grows with V by a few T x V arrays only (measured 0.11-0.25
    # of T * K * dV * 8 at T=1024-2048, K=64, V 8 -> 64; a state per token would make it >= 1).
    t, kd = 1024, 64
    small, large = (_pullback_peak(op, form, t, kd, vd) for vd in (8, 64))
    per_token_states = t * kd * (64 - 8) * 8
    growth = (large - small) / per_token_states
    assert growth < 0.5, f"peak {small / 1e6:.1f} MB -> {large / 1e6:.1f} MB ({growth:.2f})"
