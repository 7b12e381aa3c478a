"""Properties every backend and form must have, on odd shapes drawn by hypothesis.

API.md: every form of every backend computes the same function; streaming with
``initial_state`` and decoding with :mod:`fastweights.step` give the same results as one call.
SPEC.md section 1 lists the reductions between ops, section 4 the numerics of resets and strong
gates.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from _support import (
    assert_result,
    engines,
    implemented_as,
    numpy_backends,
    run,
    shared_engines,
    step_backends,
)
from hypothesis import given
from hypothesis import strategies as st

from fastweights.backends import RULES, dims_of
from fastweights.testing import OPS, Call, random_call, run_steps, to_numpy

LENGTHS = (1, 2, 5, 16, 17, 63, 64, 67, 75)
DIMS = (1, 3, 5, 8, 12)
CHUNKS = (1, 7, 16, 64)
GATED = ("simple_gla", "gla", "gated_delta_rule", "kda", "delta_product")


@st.composite
def calls(
    draw: st.DrawFn,
    op: str | None = None,
    *,
    packed: bool | None = None,
    gates: str | None = None,
    max_length: int = 75,
) -> Call:
    """A random call of ``op`` with odd sizes (see SPEC.md section 4, "Odd sizes matter")."""
    op = op or draw(st.sampled_from(OPS))
    if packed is None:
        packed = draw(st.booleans())
    seqlens = None
    if packed:
        seqlens = draw(st.lists(st.sampled_from([0, 1, 2, 5, 17, 40]), min_size=1, max_size=4))
    has_beta = op in ("delta_rule", "gated_delta_rule", "delta_product", "kda")
    return random_call(
        op,
        seed=draw(st.integers(0, 2**16)),
        batch=draw(st.integers(1, 2)),
        length=draw(st.sampled_from([t for t in LENGTHS if t <= max_length])),
        heads=draw(st.integers(1, 2)),
        groups=draw(st.integers(1, 3)),
        key_dim=draw(st.sampled_from(DIMS)),
        value_dim=draw(st.sampled_from(DIMS)),
        num_householder=draw(st.integers(1, 3)),
        seqlens=seqlens,
        initial_state=draw(st.booleans()),
        gates=gates or draw(st.sampled_from(["normal", "zero", "strong", "reset"])),
        beta_per_value=has_beta and draw(st.booleans()),
        normalize=op == "linear_attn" and draw(st.booleans()),
        use_qk_l2norm="use_qk_l2norm" in RULES[op].common and draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5])) if "scale" in RULES[op].common else None,
    )


# -- every form is the same function ---------------------------------------------------------


@given(call=calls(), chunk_size=st.sampled_from(CHUNKS))
def test_every_form_equals_the_naive_oracle(call: Call, chunk_size: int) -> None:
    want = call.expected()
    for backend, form in engines(call):
        got = run(call, backend, form, chunk_size=chunk_size, output_final_state=True)
        assert_result(got, want, dtype="float64", form=form, name=f"{backend}/{form}")


@given(call=calls(packed=False), data=st.data())
def test_streaming_in_pieces_equals_one_call(call: Call, data: st.DataObject) -> None:
    length = call.length
    per_token = {a.name for a in RULES[call.op].arrays if {"T", "R"} & set(dims_of(a.shape))}
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, length - 1)), max_size=3)))
    bounds = [0, *[c for c in cuts if 0 < c < length], length]
    n = call.kwargs.get("num_householder", 1)
    want = call.expected()
    for backend, form in engines(call):
        state = call.arrays.get("initial_state")
        outs = []
        for a, b in itertools.pairwise(bounds):
            arrays: dict[str, Any] = {"initial_state": state}
            for name, x in call.arrays.items():
                if name not in per_token:
                    arrays.setdefault(name, x)
                else:
                    rows = n if call.op == "delta_product" and name in ("k", "v", "beta") else 1
                    arrays[name] = x[:, a * rows : b * rows]
            o, state = run(
                replace(call, arrays=arrays), backend, form, chunk_size=16, output_final_state=True
            )
            outs.append(to_numpy(o))
        got = (np.concatenate(outs, axis=1), state)
        assert_result(got, want, dtype="float64", form=form, name=f"{backend}/{form}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(call=calls(packed=False, max_length=17), extra=st.integers(0, 3), seed=st.integers(0, 99))
def test_decoding_steps_equal_one_call(call: Call, extra: int, seed: int, dtype: str) -> None:
    """T steps through a pool with ``state_indices`` permuted into a larger pool."""
    if call.per_value_beta:
        call = replace(call, arrays={**call.arrays, "beta": call.arrays["beta"][..., 0]})
    rng = np.random.default_rng(seed)
    batch = call.arrays[RULES[call.op].arrays[0].name].shape[0]
    size = batch + extra
    idx = rng.permutation(size)[:batch]
    s0 = call.arrays.get("initial_state")
    if s0 is None:
        s0 = _start(call, batch)
        call = replace(call, arrays={**call.arrays, "initial_state": s0})
    parts = s0 if isinstance(s0, tuple) else (s0,)
    want = call.cast(np.dtype(dtype)).cast(np.float64).expected()
    cast = call.cast(np.dtype(dtype))
    for backend in step_backends(call.op):
        pools = []
        for part in parts:
            pool = rng.standard_normal((size, *part.shape[1:])).astype(dtype)
            pool[idx] = part
            pools.append(pool)
        before = [p.copy() for p in pools]
        state = tuple(pools) if len(pools) > 1 else pools[0]
        decoded = run_steps(cast, state, state_indices=idx, backend=backend)
        assert decoded.in_place, "a NumPy state pool is updated in place and returned"
        final = tuple(p[idx] for p in pools)
        got = (decoded.o, final if len(final) > 1 else final[0])
        assert_result(got, want, dtype=dtype, form="recurrent", name=backend)
        for p, b in zip(pools, before, strict=True):
            assert p.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(np.delete(p, idx, 0), np.delete(b, idx, 0))


def _start(call: Call, batch: int) -> Any:
    """The state a call without ``initial_state`` starts from: zeros, or ``srwm``'s ``W0``."""
    if call.op == "srwm":
        return np.repeat(call.arrays["W0"][None], batch, axis=0)
    q, v = call.arrays["q"], call.arrays["v"]
    sizes = {"N": batch, "HV": v.shape[2], "K": q.shape[3], "V": v.shape[3]}
    layout = RULES[call.op].state_layout(normalize=call.kwargs.get("normalize", False))
    parts = tuple(np.zeros(tuple(sizes[d] for d in dims_of(a.shape))) for a in layout)
    return parts if len(parts) > 1 else parts[0]


# -- reductions between ops (SPEC.md section 1) ----------------------------------------------


def _assert_same_function(a: Call, b: Call, *, read: Any = None) -> None:
    pairs = list(shared_engines(a, b))
    assert pairs, f"no backend runs both {a.op} and {b.op}"
    for backend, form in pairs:
        got = run(a, backend, form, output_final_state=True)
        other = run(b, backend, form, output_final_state=True)
        if read is not None:
            other = (read(to_numpy(other[0])), other[1])
        assert_result(got, other, dtype="float64", form=form, name=f"{backend}/{form}")


def _as(call: Call, op: str, drop: tuple[str, ...] = (), **arrays: Any) -> Call:
    kept = {n: x for n, x in call.arrays.items() if n not in drop}
    kwargs = {n: v for n, v in call.kwargs.items() if n != "num_householder" or op == call.op}
    return Call(op, {**kept, **arrays}, kwargs)


@given(call=calls("gated_delta_rule", gates="zero"))
def test_gated_delta_rule_with_zero_gate_is_delta_rule(call: Call) -> None:
    _assert_same_function(call, _as(call, "delta_rule", drop=("g",)))


@given(call=calls("simple_gla", gates="zero"))
def test_simple_gla_with_zero_gate_is_linear_attn(call: Call) -> None:
    _assert_same_function(call, _as(call, "linear_attn", drop=("g",)))


@given(call=calls("simple_gla"))
def test_gla_with_broadcast_gate_is_simple_gla(call: Call) -> None:
    g = call.arrays["g"]
    gk = np.repeat(g[..., None], call.arrays["q"].shape[-1], axis=-1)
    _assert_same_function(_as(call, "gla", drop=("g",), gk=gk), call)


@given(call=calls("gated_delta_rule"))
def test_kda_with_broadcast_gate_is_gated_delta_rule(call: Call) -> None:
    g = call.arrays["g"]
    gk = np.repeat(g[..., None], call.arrays["q"].shape[-1], axis=-1)
    _assert_same_function(_as(call, "kda", drop=("g",), gk=gk), call)


@given(call=calls("gated_delta_rule"), gated=st.booleans())
def test_delta_product_with_one_step_is_gated_delta_rule(call: Call, gated: bool) -> None:
    other = call if gated else _as(call, "delta_rule", drop=("g",))
    product = Call("delta_product", dict(other.arrays), {**other.kwargs, "num_householder": 1})
    _assert_same_function(product, other)


@given(call=calls("delta_product"))
def test_delta_product_is_the_delta_rule_on_the_interleaved_sequence(call: Call) -> None:
    """Steps ``t*n .. t*n+n-1`` carry token ``t``: the gate on the first, the read on the last."""
    n = call.kwargs["num_householder"]
    q = call.arrays["q"]
    batch, length = q.shape[:2]
    q_long = np.zeros((batch, length * n, *q.shape[2:]))
    q_long[:, n - 1 :: n] = q
    arrays = {name: x for name, x in call.arrays.items() if name != "g"}
    arrays["q"] = q_long
    scale = call.kwargs.get("scale", q.shape[-1] ** -0.5)
    kwargs = {k: v for k, v in call.kwargs.items() if k != "num_householder"}
    kwargs["scale"] = scale
    g = call.arrays.get("g")
    if g is not None:
        g_long = np.zeros((batch, length * n, g.shape[2]))
        g_long[:, ::n] = g
        arrays["g"] = g_long
    if call.varlen:
        arrays["cu_seqlens"] = call.arrays["cu_seqlens"] * n
    op = "delta_rule" if g is None else "gated_delta_rule"
    interleaved = Call(op, arrays, kwargs)
    product = replace(call, kwargs={**call.kwargs, "scale": scale})
    _assert_same_function(product, interleaved, read=lambda o: o[:, n - 1 :: n])


@given(call=calls("simple_gla"))
def test_retention_is_simple_gla_with_fixed_decay(call: Call) -> None:
    hv = call.arrays["v"].shape[2]
    g = np.broadcast_to(np.log(1 - 2.0 ** (-5.0 - np.arange(hv))), call.arrays["g"].shape)
    _assert_same_function(
        _as(call, "retention", drop=("g",)), replace(call, arrays={**call.arrays, "g": g})
    )


@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule", "kda", "delta_product"])
def test_delta_step_with_unit_key_and_beta_one_overwrites(op: str) -> None:
    """With ``||k|| = 1`` and ``beta = 1``, ``S_t^T k_t = v_t``: reading with ``q = k`` gives v."""
    call = random_call(op, seed=5, length=45, key_dim=16, value_dim=9, groups=2)
    n = call.kwargs.get("num_householder", 1)
    last_key = call.arrays["k"][:, n - 1 :: n]
    arrays = {**call.arrays, "q": last_key, "beta": np.ones_like(call.arrays["beta"])}
    call = Call(op, arrays, {**call.kwargs, "scale": 1.0})
    want = call.arrays["v"][:, n - 1 :: n]
    for backend, form in engines(call):
        o, _ = run(call, backend, form)
        np.testing.assert_allclose(to_numpy(o), want, rtol=1e-10, atol=1e-10, err_msg=form)


# -- numerics (SPEC.md section 4) ------------------------------------------------------------


def _gate_name(op: str) -> str:
    return "gk" if op in ("gla", "kda") else "g"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op", GATED)
@given(seed=st.integers(0, 2**16), at=st.integers(0, 40))
def test_minus_inf_gate_resets_to_zero_state(op: str, dtype: str, seed: int, at: int) -> None:
    """After ``g = -inf`` at token ``at`` the op continues as a fresh call from a zero state."""
    call = random_call(op, seed=seed, length=41, initial_state=True)
    gate = call.arrays[_gate_name(op)].copy()
    gate[:, at] = -np.inf
    call = replace(call, arrays={**call.arrays, _gate_name(op): gate}).cast(np.dtype(dtype))
    n = call.kwargs.get("num_householder", 1)
    tail = {}
    for name, x in call.arrays.items():
        if name != "initial_state":
            rows = n if op == "delta_product" and name in ("k", "v", "beta") else 1
            tail[name] = x[:, at * rows :]
    fresh = replace(call, arrays=tail).cast(np.float64).expected()
    for backend, form in engines(call):
        o, state = run(call, backend, form, output_final_state=True, chunk_size=16)
        o, state = to_numpy(o), to_numpy(state)
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(state)), f"{backend}/{form}"
        assert_result((o[:, at:], state), fresh, dtype=dtype, form=form, name=f"{backend}/{form}")


@pytest.mark.parametrize("op", GATED)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_strong_gates_stay_finite_in_float32(op: str, chunk_size: int) -> None:
    """Gates in ``[-8, -3]``: the cumulative decay inside a chunk falls far below -88."""
    call = random_call(op, seed=3, length=75, gates="strong", key_dim=16, value_dim=16)
    want = call.expected()
    cast = call.cast(np.float32)
    for backend, form in engines(cast):
        got = run(cast, backend, form, output_final_state=True, chunk_size=chunk_size)
        assert np.all(np.isfinite(to_numpy(got[0]))), f"{backend}/{form}"
        assert_result(got, want, dtype="float32", form=form, name=f"{backend}/{form}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op", GATED)
def test_gates_of_zero_and_very_negative_mixed_stay_exact(op: str, dtype: str) -> None:
    """SPEC.md section 4: alpha = 1 and alpha ~ 0 side by side (fla issues #104/#389)."""
    call = random_call(op, seed=6, length=70, key_dim=16, value_dim=16)
    name = _gate_name(op)
    rng = np.random.default_rng(6)
    gate = rng.choice([0.0, -1e-7, -50.0, -700.0, -1e4, -1e30], size=call.arrays[name].shape)
    call = replace(call, arrays={**call.arrays, name: gate})
    want = call.expected()
    cast = call.cast(np.dtype(dtype))
    for backend, form in engines(cast):
        got = run(cast, backend, form, output_final_state=True, chunk_size=16)
        assert_result(got, want, dtype=dtype, form=form, name=f"{backend}/{form}")


def test_every_op_has_a_backend() -> None:
    names = {implemented_as(op) for op in OPS}
    for op in names:
        assert any(op in b.ops for b in numpy_backends()), op
