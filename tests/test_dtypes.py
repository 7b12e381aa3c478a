"""API.md "Compute dtype": float64 when any floating input is float64, else float32 (float16
inputs accumulate in float32); the final state has the compute dtype, ``o`` has ``v``'s dtype;
a decoding pool keeps its own dtype."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from _support import assert_result, engines, run, step_backends

from fastweights.testing import OPS, Call, random_call, run_steps, to_numpy

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


def _mixed(call: Call, default: np.dtype, **dtypes: np.dtype) -> Call:
    out = {}
    for name, x in call.cast(default).arrays.items():
        if name in dtypes:
            x = call.arrays[name].astype(dtypes[name])
        out[name] = x
    return replace(call, arrays=out)


@pytest.mark.parametrize("wide", ["q", "k", "beta", "initial_state"])
def test_any_float64_input_makes_the_computation_float64(wide: str) -> None:
    call = random_call("gated_delta_rule", seed=1, length=21)
    mixed = _mixed(call, F32, **{wide: F64})
    # Everything the oracle sees is what the op sees: the float32-rounded inputs.
    want = mixed.cast(F64).expected()
    for backend, form in engines(mixed):
        o, state = run(mixed, backend, form, output_final_state=True)
        assert to_numpy(o).dtype == F32
        assert to_numpy(state).dtype == F64
        # o is rounded to float32 at the end only: far below the float32 tolerances.
        assert_result((o, state), want, dtype=F32, form="recurrent", name=f"{backend}/{form}")
        np.testing.assert_allclose(to_numpy(state), want[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_float16_inputs_give_float16_output_and_float32_state(op: str) -> None:
    call = random_call(op, seed=2, length=21).cast(F16)
    want = call.cast(F64).expected()
    for backend, form in engines(call):
        o, state = run(call, backend, form, output_final_state=True)
        assert to_numpy(o).dtype == F16
        parts = state if isinstance(state, tuple) else (state,)
        assert all(to_numpy(x).dtype == F32 for x in parts)
        assert_result((o, state), want, dtype=F16, form=form, name=f"{backend}/{form}")


def test_float32_v_with_float64_q_returns_float32_output() -> None:
    call = _mixed(random_call("linear_attn", seed=3), F64, v=F32)
    o, state = run(call, output_final_state=True)
    assert to_numpy(o).dtype == F32 and to_numpy(state).dtype == F64


@pytest.mark.parametrize(("inputs", "pool"), [(F64, F32), (F32, F64), (F16, F32)])
@pytest.mark.parametrize("op", ["gated_delta_rule", "kda", "delta_product"])
def test_step_keeps_the_pool_dtype(op: str, inputs: np.dtype, pool: np.dtype) -> None:
    call = random_call(op, seed=4, batch=2, length=3).cast(inputs)
    want = call.cast(F64).expected()
    for backend in step_backends(op):
        state = call.arrays["initial_state"].astype(pool)
        decoded = run_steps(call, state, backend=backend)
        assert decoded.state is state and state.dtype == pool
        assert decoded.o.dtype == inputs
        tol_dtype = F16 if F16 in (inputs, pool) else F32
        assert_result(
            (decoded.o, state), want, dtype=tol_dtype, form="recurrent", name=f"{backend}"
        )


def test_integer_scale_is_a_scale() -> None:
    call = random_call("delta_rule", seed=5, length=9)
    with_int = replace(call, kwargs={**call.kwargs, "scale": 1})
    with_float = replace(call, kwargs={**call.kwargs, "scale": 1.0})
    np.testing.assert_array_equal(to_numpy(run(with_int)[0]), to_numpy(run(with_float)[0]))
