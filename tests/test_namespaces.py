"""Any Array API namespace in, the same namespace out, with the same values as NumPy.

The automatic backend choice must find a backend for array-api-strict, torch (CPU) and JAX
arrays (the reference accepts every namespace). Decoding updates a torch pool in place and
returns a new one for JAX.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _support import assert_result, implemented_as, reference_backend

import fastweights
from fastweights.testing import OPS, Call, random_call, run_steps

xps = pytest.importorskip("array_api_strict")


def _calls() -> list[Any]:
    out = []
    for op in OPS:
        out.append(pytest.param(random_call(op, seed=1, groups=2, length=19), id=op))
        out.append(pytest.param(random_call(op, seed=2, seqlens=[3, 0, 9]), id=f"{op}-packed"))
    out.append(
        pytest.param(random_call("linear_attn", seed=3, normalize=True), id="linear_attn-norm")
    )
    return out


def _forms(call: Call) -> list[str]:
    return call.forms(reference_backend().ops[implemented_as(call.op)])


def _module(x: Any) -> str:
    return type(x).__module__.split(".")[0]


def _leaves(state: Any) -> tuple[Any, ...]:
    return state if isinstance(state, tuple) else (state,)


def _pool(xp: Any, state: Any, *, reverse: bool = False) -> Any:
    """A state (or a pair) as pools of namespace ``xp`` (rows reversed if ``reverse``)."""
    parts = tuple(xp.asarray((x[::-1] if reverse else x).copy()) for x in _leaves(state))
    return parts if isinstance(state, tuple) else parts[0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("call", _calls())
def test_array_api_strict_in_and_out(call: Call, dtype: str) -> None:
    cast = call.cast(np.dtype(dtype))
    want = call.expected()
    for form in _forms(call):
        o, state = cast.run(getattr(fastweights, call.op), xps, form=form, output_final_state=True)
        assert _module(o) == "array_api_strict"
        assert o.dtype == getattr(xps, dtype)
        for part in _leaves(state):
            assert _module(part) == "array_api_strict"
        assert_result((o, state), want, dtype=dtype, form=form, name=form)


@pytest.mark.parametrize("op", OPS)
def test_array_api_strict_decoding(op: str) -> None:
    call = random_call(op, seed=4, batch=2, length=5)
    want = call.expected()
    pool = _pool(xps, call.arrays["initial_state"], reverse=True)
    decoded = run_steps(call, pool, state_indices=xps.asarray([1, 0]), xp=xps)
    assert all(_module(x) == "array_api_strict" for x in _leaves(decoded.state))
    flipped = tuple(x[::-1] for x in _leaves(want[1]))
    want = (want[0], flipped if isinstance(want[1], tuple) else flipped[0])
    assert_result((decoded.o, decoded.state), want, dtype="float64", form="recurrent")


def _torch() -> Any:
    pytest.importorskip("torch")
    from array_api_compat import torch as xp

    return xp


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op", OPS)
def test_torch_cpu_in_and_out(op: str, dtype: str) -> None:
    xp = _torch()
    call = random_call(op, seed=5, groups=2, length=19)
    want = call.expected()
    for form in _forms(call):
        o, state = call.cast(np.dtype(dtype)).run(
            getattr(fastweights, op), xp, form=form, output_final_state=True
        )
        assert _module(o) == "torch"
        assert str(o.dtype) == f"torch.{dtype}"
        assert_result((o, state), want, dtype=dtype, form=form, name=form)


@pytest.mark.parametrize("op", OPS)
def test_torch_decoding_updates_the_pool_in_place(op: str) -> None:
    xp = _torch()
    call = random_call(op, seed=6, batch=2, length=4)
    pool = _pool(xp, call.arrays["initial_state"])
    decoded = run_steps(call, pool, xp=xp)
    assert decoded.in_place and decoded.state is pool
    assert_result((decoded.o, decoded.state), call.expected(), dtype="float64", form="recurrent")


def _jax() -> Any:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return jnp


def _jax_ops() -> list[object]:
    """Every op; jax compiles each one (1-8 s), so the quick subset (-m "not slow") keeps one."""
    keep = ("linear_attn",)
    return [op if op in keep else pytest.param(op, marks=pytest.mark.slow) for op in OPS]


@pytest.mark.parametrize("op", _jax_ops())
def test_jax_in_and_out(op: str) -> None:
    jnp = _jax()
    call = random_call(op, seed=7, groups=2, length=9)
    want = call.expected()
    for form in _forms(call):
        o, state = call.cast(np.float32).run(
            getattr(fastweights, op), jnp, form=form, output_final_state=True
        )
        assert _module(o) in ("jax", "jaxlib")
        assert_result((o, state), want, dtype="float32", form=form, name=form)


@pytest.mark.parametrize("op", _jax_ops())
def test_jax_decoding_returns_a_new_state(op: str) -> None:
    jnp = _jax()
    call = random_call(op, seed=8, batch=2, length=4).cast(np.float32)
    start = call.arrays["initial_state"]
    pool = _pool(jnp, start)
    decoded = run_steps(call, pool, xp=jnp)
    assert decoded.state is not pool
    for x, x0 in zip(_leaves(pool), _leaves(start), strict=True):
        np.testing.assert_array_equal(np.asarray(x), x0)
    want = call.cast(np.float64).expected()
    assert_result((decoded.o, decoded.state), want, dtype="float32", form="recurrent")


@pytest.mark.parametrize(
    "op", [pytest.param("simple_gla", marks=pytest.mark.slow), "gated_delta_rule",
           pytest.param("kda", marks=pytest.mark.slow)]
)  # fmt: skip
def test_jax_jit_with_gates(op: str) -> None:
    """Under jax.jit the gates are tracers: their sign cannot be read, and they have no
    device; both checks must let them through (and still run on concrete arrays)."""
    jnp = _jax()
    import jax

    call = random_call(op, seed=10, length=12, initial_state=False).cast(np.float32)
    args, kwargs = call.arguments(jnp)
    fn = getattr(fastweights, op)
    # q and k stay concrete (closed over), the rest is traced: mixed inputs in one call.
    jitted = jax.jit(lambda *rest: fn(args[0], args[1], *rest, **kwargs, form="chunk")[0])
    o = jitted(*args[2:])
    assert_result((o, None), (call.expected()[0], None), dtype="float32", form="chunk")
    # Inside a trace even a concrete gate's comparison is traced (jit of grad, gate closed over).
    grad = jax.jit(jax.grad(lambda v: fn(args[0], args[1], v, *args[3:], **kwargs)[0].sum()))
    assert grad(args[2]).shape == args[2].shape
    bad = list(args)
    bad[3] = -bad[3] + 1.0  # the gate (g or gk), now positive somewhere
    with pytest.raises(ValueError, match="log-decay"):
        fn(*bad, **kwargs)


@pytest.mark.parametrize("kind", ["list", "tuple", "int32", "array_api_strict"])
def test_state_indices_may_be_any_integer_array_like(kind: str) -> None:
    call = random_call("gated_delta_rule", seed=9, batch=2, length=3)
    want = call.expected()
    indices = {
        "list": [2, 0],
        "tuple": (2, 0),
        "int32": np.array([2, 0], dtype=np.int32),
        "array_api_strict": xps.asarray([2, 0]),
    }[kind]
    pool = np.zeros((3, *call.arrays["initial_state"].shape[1:]))
    pool[[2, 0]] = call.arrays["initial_state"]
    decoded = run_steps(call, pool, state_indices=indices)
    assert decoded.state is pool
    assert_result((decoded.o, pool[[2, 0]]), want, dtype="float64", form="recurrent")
    np.testing.assert_array_equal(pool[1], 0.0)


def test_arrays_on_different_devices_raise_type_error() -> None:
    torch = pytest.importorskip("torch")
    call = random_call("delta_rule", seed=10, length=4)
    q, k, v, beta = (torch.asarray(call.arrays[n]) for n in ("q", "k", "v", "beta"))
    with pytest.raises(TypeError, match=r"\bk\b"):
        fastweights.delta_rule(q, k.to("meta"), v, beta)
