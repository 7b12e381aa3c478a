"""The ``cupy`` backend on a real GPU, with CuPy arrays.

Skipped (never passed) where CuPy is missing or sees no CUDA device. Run with
``pytest -m gpu tests/cuda`` or ``python -m fastweights gpu-check``.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastweights
import fastweights.step
from fastweights.testing import assert_close, check_backend, random_call, run_steps

pytestmark = pytest.mark.gpu


def _cupy():
    try:
        import cupy
    except Exception as exc:
        pytest.skip(f"cupy is not importable ({type(exc).__name__}: {exc})")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:
        pytest.skip(f"no CUDA device ({type(exc).__name__})")
    return cupy


@pytest.fixture(scope="module")
def cp(request):
    return _cupy()


@pytest.fixture(autouse=True)
def _not_emulated(monkeypatch):
    monkeypatch.delenv("FASTWEIGHTS_CUDA_EMULATE", raising=False)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_conformance_suite(cp, dtype):
    check_backend("cupy", xp=cp, dtypes=(dtype,))


def test_automatic_choice_takes_cupy_for_cupy_arrays(cp):
    from fastweights import _registry, _validate

    call = random_call("gated_delta_rule", length=3)
    args, _ = call.arguments(cp)
    checked = _validate.validate("gated_delta_rule", *args[:3], g=args[3], beta=args[4])
    assert _registry.select(checked, None).name == "cupy"


# One K per tile height (8, 16, 32, 64, 128, 256 rows), two of them padded (13, 100).
@pytest.mark.parametrize("K", [8, 13, 32, 64, 100, 128, 256])
@pytest.mark.parametrize("op", ["kda", "gated_delta_rule", "linear_attn"])
def test_large_heads_every_tile(cp, op, K):
    call = random_call(op, seed=K, batch=2, length=40, heads=2, groups=2, key_dim=K, value_dim=72)
    want = call.expected()
    for dtype in ("float64", "float32"):
        o, state = call.cast(np.dtype(dtype)).run(
            getattr(fastweights, op), cp, backend="cupy", output_final_state=True
        )
        assert isinstance(o, cp.ndarray) and o.dtype == np.dtype(dtype)
        assert_close(o, want[0], dtype=dtype, form="recurrent", name=f"{op} K={K} o")
        assert_close(state, want[1], dtype=dtype, form="recurrent", name=f"{op} K={K} state")


def test_long_packed_sequences(cp):
    call = random_call(
        "gated_delta_rule", seed=1, seqlens=[700, 0, 1, 333], key_dim=128, value_dim=128
    )
    want = call.expected()
    o, state = call.cast(np.float32).run(
        fastweights.gated_delta_rule, cp, backend="cupy", output_final_state=True
    )
    assert_close(o, want[0], dtype="float32", form="recurrent")
    assert_close(state, want[1], dtype="float32", form="recurrent")


def test_decoding_updates_the_pool_in_place(cp):
    call = random_call("gated_delta_rule", seed=2, batch=5, length=4, key_dim=128, value_dim=64)
    want = call.expected()
    idx = np.array([7, 1, 4, 0, 9])
    pool = cp.zeros((10, *call.arrays["initial_state"].shape[1:]), dtype=cp.float32)
    pool[cp.asarray(idx)] = cp.asarray(call.arrays["initial_state"], dtype=cp.float32)
    before = pool.copy()
    got = run_steps(
        call.cast(np.float32), pool, state_indices=cp.asarray(idx), backend="cupy", xp=cp
    )
    assert got.in_place and got.state is pool
    assert_close(got.o, want[0], dtype="float32", form="recurrent")
    assert_close(pool[cp.asarray(idx)], want[1], dtype="float32", form="recurrent")
    others = np.setdiff1d(np.arange(10), idx)
    assert bool((pool[cp.asarray(others)] == before[cp.asarray(others)]).all())


def test_noncontiguous_cupy_inputs_are_not_modified(cp):
    call = random_call("kda", seed=3, length=9, key_dim=32, value_dim=16)
    a = call.arrays
    fused = cp.asarray(np.concatenate([a["q"], a["k"]], axis=-1), dtype=cp.float32)
    q, k = fused[..., :32], fused[..., 32:]
    v = cp.asarray(a["v"].transpose(0, 2, 1, 3).copy(), dtype=cp.float32).transpose(0, 2, 1, 3)
    gk, beta = cp.asarray(a["gk"], dtype=cp.float32), cp.asarray(a["beta"], dtype=cp.float32)
    saved = fused.copy()
    o, _ = fastweights.kda(
        q, k, v, gk, beta, initial_state=cp.asarray(a["initial_state"]), backend="cupy"
    )
    assert bool((fused == saved).all())
    assert_close(o, call.expected()[0], dtype="float32", form="recurrent")
