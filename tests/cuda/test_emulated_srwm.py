"""The ``cupy`` backend's self-referential weight matrix kernel (``kernels/srwm.cu``) on the
CPU through the emulator (no GPU needed): sequences against the float64 oracle (packed with
empty sequences, from ``W0`` or an initial state, every register tile and 1 to 8 column tiles,
several thread orders), decoding into a permuted pool equals one call, a pool of another
dtype, the column limit, float16 inputs, and one AddressSanitizer pass. There are no golden
cases of this rule: the oracle is ``fastweights.rules.srwm.recurrent``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastweights
from fastweights.backends import get_backend
from fastweights.testing import assert_close, random_call, run_steps

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(
        shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None, reason="g++ is not on PATH"
    ),
]


def _check(call, dtype):
    want = call.expected()
    o, W = call.cast(np.dtype(dtype)).run(fastweights.srwm, backend="cupy", output_final_state=True)
    assert o.dtype == np.dtype(dtype)
    assert_close(o, want[0], dtype=dtype, form="recurrent", name="o")
    assert_close(W, want[1], dtype=dtype, form="recurrent", name="W")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sequences(dtype, emulate, order):
    _check(random_call("srwm", seed=1, batch=2, length=6), dtype)
    _check(random_call("srwm", seed=2, seqlens=[0, 3, 0, 1, 5], initial_state=False), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("K", "V"), [(3, 1), (5, 40), (12, 200), (40, 3)])
def test_every_register_tile(K, V, dtype, emulate):
    """D in the 8- and 64-row tiles, 1, 2, 4 and 8 column tiles per thread."""
    _check(random_call("srwm", seed=K + V, batch=1, length=3, key_dim=K, value_dim=V), dtype)


def test_decoding_equals_sequence(emulate, order):
    call = random_call("srwm", seed=3, batch=3, length=4)
    want = call.expected()
    s0 = call.arrays["initial_state"]
    idx = np.array([4, 0, 2])
    pool = np.full((5, *s0.shape[1:]), 7.0)
    pool[idx] = s0
    got = run_steps(call, pool, state_indices=idx, backend="cupy")
    assert got.in_place
    assert_close(got.o, want[0], dtype="float64", form="recurrent")
    assert_close(got.state[idx], want[1], dtype="float64", form="recurrent")
    np.testing.assert_array_equal(np.delete(pool, idx, axis=0), 7.0)


def test_decoding_pool_of_another_dtype(emulate):
    call = random_call("srwm", seed=8, batch=2, length=3)
    want = call.expected()
    pool = call.arrays["initial_state"].astype(np.float32)
    got = run_steps(call, pool, backend="cupy")
    assert got.in_place and got.state.dtype == np.float32
    assert_close(got.o, want[0], dtype="float32", form="recurrent")
    assert_close(got.state, want[1], dtype="float32", form="recurrent")


def test_column_limit_and_plan(emulate):
    b = get_backend("cupy")
    assert b.ops["srwm"] == ("recurrent",) and "srwm" in b.step_ops
    call = random_call("srwm", seed=4, batch=1, length=2, key_dim=60, value_dim=300)
    with pytest.raises(TypeError, match=r"V \+ 2D \+ 4 <= 256 at D = 60"):
        call.run(fastweights.srwm, backend="cupy")
    o, _ = call.run(fastweights.srwm)  # another backend takes it
    assert_close(o, call.expected()[0], dtype="float64", form="recurrent")


def test_float16_inputs(emulate):
    call = random_call("srwm", seed=6, batch=2, length=4, initial_state=False)
    want = call.expected()
    o, W = call.cast(np.dtype(np.float16)).run(
        fastweights.srwm, backend="cupy", output_final_state=True
    )
    assert o.dtype == np.float16 and W.dtype == np.float32
    assert_close(o, want[0], dtype="float16", form="recurrent")


_SANITIZED = """
import numpy as np, fastweights
from fastweights.testing import assert_close, random_call, run_steps
for kw in ({}, {"seqlens": [2, 0, 1]}, {"key_dim": 40, "value_dim": 3}, {"value_dim": 200}):
    call = random_call("srwm", seed=1, batch=1, length=3, **kw)
    got = call.run(fastweights.srwm, output_final_state=True, backend="cupy")
    assert_close(got[0], call.expected()[0], dtype="float64", form="recurrent")
call = random_call("srwm", seed=2, batch=2, length=3)
pool = np.zeros((4, *call.arrays["initial_state"].shape[1:]))
pool[[3, 1]] = call.arrays["initial_state"]
run_steps(call, pool, state_indices=np.array([3, 1]), backend="cupy")
print("sanitized run ok")
"""


@pytest.mark.slow
def test_under_address_sanitizer():
    path = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not os.path.isabs(path):
        pytest.skip("gcc has no libasan")
    cxx = subprocess.run(
        ["gcc", "-print-file-name=libstdc++.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    env = dict(
        os.environ,
        FASTWEIGHTS_CUDA_EMULATE="1",
        CUDASIM_CXXFLAGS="-fsanitize=address",
        LD_PRELOAD=f"{path} {cxx}",
        ASAN_OPTIONS="detect_leaks=0",
    )
    r = subprocess.run(
        [sys.executable, "-c", _SANITIZED],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert "Sanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0 and "sanitized run ok" in r.stdout, r.stderr[-4000:]
