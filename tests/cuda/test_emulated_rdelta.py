"""The ``cupy`` backend's Recurrent DeltaNet kernel (``kernels/recurrent_delta.cu``) on the
CPU through the emulator (no GPU needed): sequences against the float64 oracle (packed with
empty sequences, every register tile and value-tile count, several thread orders), decoding
into a permuted pool equals one call, a pool of another dtype, the ``V`` limit, float16
inputs, and one AddressSanitizer pass. There are no golden cases of this rule: the oracle is
``fastweights.rules.recurrent_delta.recurrent`` (``random_call(...).expected()``).
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

OP = "recurrent_delta_rule"


def _check(call, dtype):
    want = call.expected()
    o, (S, last) = call.cast(np.dtype(dtype)).run(
        fastweights.recurrent_delta_rule, backend="cupy", output_final_state=True
    )
    assert o.dtype == np.dtype(dtype)
    assert_close(o, want[0], dtype=dtype, form="recurrent", name="o")
    assert_close(S, want[1][0], dtype=dtype, form="recurrent", name="S")
    assert_close(last, want[1][1], dtype=dtype, form="recurrent", name="o_last")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sequences(dtype, emulate, order):
    _check(random_call(OP, seed=1, batch=2, length=6), dtype)
    _check(random_call(OP, seed=2, seqlens=[0, 3, 0, 1, 5]), dtype)
    _check(random_call(OP, seed=3, batch=1, length=3, initial_state=False), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("K", "V"), [(5, 40), (5, 100), (100, 33), (200, 9)])
def test_every_register_tile(K, V, dtype, emulate):
    """Key sizes of the 8-, 128- and 256-row tiles and 1, 2 and 4 value tiles per thread."""
    _check(random_call(OP, seed=K + V, batch=1, length=3, key_dim=K, value_dim=V), dtype)


def test_decoding_equals_sequence(emulate, order):
    call = random_call(OP, seed=3, batch=3, length=4)
    want = call.expected()
    S0, l0 = call.arrays["initial_state"]
    idx = np.array([4, 0, 2])
    pools = []
    for part in (S0, l0):
        pool = np.full((5, *part.shape[1:]), 7.0)
        pool[idx] = part
        pools.append(pool)
    got = run_steps(call, tuple(pools), state_indices=idx, backend="cupy")
    assert got.in_place
    assert_close(got.o, want[0], dtype="float64", form="recurrent")
    for fin, ref, pool in zip(got.state, want[1], pools, strict=True):
        assert_close(fin[idx], ref, dtype="float64", form="recurrent")
        np.testing.assert_array_equal(np.delete(pool, idx, axis=0), 7.0)


def test_decoding_pool_of_another_dtype(emulate):
    call = random_call(OP, seed=8, batch=2, length=3)
    want = call.expected()
    pools = tuple(x.astype(np.float32) for x in call.arrays["initial_state"])
    got = run_steps(call, pools, backend="cupy")
    assert got.in_place and got.state[0].dtype == np.float32
    assert_close(got.o, want[0], dtype="float32", form="recurrent")
    assert_close(got.state[0], want[1][0], dtype="float32", form="recurrent")


def test_value_limit_and_plan(emulate):
    b = get_backend("cupy")
    assert b.ops[OP] == ("recurrent",) and OP in b.step_ops
    call = random_call(OP, seed=4, batch=1, length=2, key_dim=200, value_dim=33)
    with pytest.raises(TypeError, match="V <= 32 at K = 200"):
        call.run(fastweights.recurrent_delta_rule, backend="cupy")
    o, _ = call.run(fastweights.recurrent_delta_rule)  # another backend takes it
    assert_close(o, call.expected()[0], dtype="float64", form="recurrent")


def test_float16_inputs(emulate):
    call = random_call(OP, seed=6, batch=2, length=4, initial_state=False)
    want = call.expected()
    o, (S, _) = call.cast(np.dtype(np.float16)).run(
        fastweights.recurrent_delta_rule, backend="cupy", output_final_state=True
    )
    assert o.dtype == np.float16 and S.dtype == np.float32
    assert_close(o, want[0], dtype="float16", form="recurrent")


_SANITIZED = """
import numpy as np, fastweights
from fastweights.testing import assert_close, random_call, run_steps
for kw in ({}, {"seqlens": [2, 0, 1]}, {"key_dim": 100, "value_dim": 33}, {"value_dim": 100}):
    call = random_call("recurrent_delta_rule", seed=1, batch=1, length=3, **kw)
    got = call.run(fastweights.recurrent_delta_rule, output_final_state=True, backend="cupy")
    assert_close(got[0], call.expected()[0], dtype="float64", form="recurrent")
call = random_call("recurrent_delta_rule", seed=2, batch=2, length=3)
pools = tuple(np.zeros((4, *x.shape[1:])) for x in call.arrays["initial_state"])
for pool, x in zip(pools, call.arrays["initial_state"]):
    pool[[3, 1]] = x
run_steps(call, pools, state_indices=np.array([3, 1]), backend="cupy")
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
