"""The ``cupy`` backend's DPLR kernel (``kernels/dplr.cu``: ``dplr``, and ``iplr`` and
``rwkv7`` rewritten into it) on the CPU through the emulator (no GPU needed).

The golden2 ``dplr_*``, ``iplr_*`` and ``rwkv7_*`` cases run in ``test_emulated.py``'s
``test_golden_case`` (its list follows the backend's ``ops``); here: decoding into a permuted
pool equals one call, every register tile with value tails, packed sequences with empty ones,
``-inf`` gates with a NaN in the reset rows, float16 inputs, the plan, and one
AddressSanitizer pass over the DPLR cases.
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
from fastweights.testing import assert_close, load_golden_cases, random_call, run_steps

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(
        shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None, reason="g++ is not on PATH"
    ),
]

OPS = ("dplr", "iplr", "rwkv7")


def _run(call, **kw):
    return call.run(getattr(fastweights, call.op), backend="cupy", **kw)


def test_declared_and_planned(emulate):
    b = get_backend("cupy")
    assert b.ops["dplr"] == ("recurrent",) and "dplr" in b.step_ops
    call = random_call("rwkv7", seed=1, batch=1, length=300)
    args, kwargs = call.arguments()
    plan = fastweights.plan(fastweights.rwkv7, *args, **kwargs, backend="cupy")
    assert "recurrent" in str(plan)


@pytest.mark.parametrize("op", OPS)
def test_decoding_equals_sequence(op, emulate, order):
    call = random_call(op, seed=3, batch=3, length=5, groups=2, use_qk_l2norm=op == "dplr")
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
    """A float32 pool with float64 inputs goes through a copy of its rows, written back."""
    call = random_call("dplr", seed=8, batch=2, length=3)
    want = call.expected()
    pool32 = call.arrays["initial_state"].astype(np.float32)
    got = run_steps(call, pool32, backend="cupy")
    assert got.in_place and got.state.dtype == np.float32
    assert_close(got.state, want[1], dtype="float32", form="recurrent")
    assert_close(got.o, want[0], dtype="float32", form="recurrent")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("K", "V"), [(5, 40), (100, 33), (200, 9)])
def test_every_register_tile(K, V, dtype, emulate):
    """Key sizes of the 8-, 128- and 256-row tiles, value tails and several V tiles."""
    call = random_call(
        "dplr", seed=K + V, batch=1, length=3, heads=1, groups=2, key_dim=K, value_dim=V
    )
    want = call.expected()
    got = _run(call.cast(np.dtype(dtype)), output_final_state=True)
    assert_close(got[0], want[0], dtype=dtype, form="recurrent", name="o")
    assert_close(got[1], want[1], dtype=dtype, form="recurrent", name="state")


@pytest.mark.parametrize("op", ["dplr", "iplr"])
def test_packed_batch_with_empty_sequences(op, emulate):
    call = random_call(op, seed=5, seqlens=[0, 3, 0, 1, 6], gates="reset", use_qk_l2norm=True)
    want = call.expected()
    o, final = _run(call, output_final_state=True)
    assert_close(o, want[0], dtype="float64", form="recurrent")
    assert_close(final, want[1], dtype="float64", form="recurrent")
    np.testing.assert_array_equal(final[0], call.arrays["initial_state"][0])


def test_reset_and_nan_like_the_oracle(emulate):
    """A -inf gk drops the decayed rows exactly; the low-rank read a^T S_{t-1} still reads the
    old state (here a NaN, which 0 * NaN keeps): NaN where the oracle has NaN, equal elsewhere."""
    call = random_call("dplr", seed=10, batch=1, length=6, heads=1, initial_state=False)
    a = {k: v.copy() for k, v in call.arrays.items()}
    a["v"][0, 1, 0, 0] = np.nan  # NaN in column 0 of every row k_1 touches
    a["gk"][0, 3] = -np.inf  # every row reset at token 3 ...
    args = (a["q"], a["k"], a["v"], a["a"], a["b"], a["gk"])
    o, state = fastweights.dplr(*args, output_final_state=True, backend="cupy")
    ref = fastweights.dplr(*args, output_final_state=True, backend="reference")
    np.testing.assert_array_equal(np.isnan(o), np.isnan(ref[0]))
    np.testing.assert_array_equal(np.isnan(state), np.isnan(ref[1]))
    assert np.isfinite(o[0, :, :, 1:]).all()
    assert_close(o, ref[0], dtype="float64", form="recurrent")


def test_float16_inputs(emulate):
    call = random_call("rwkv7", seed=4, batch=2, length=5, initial_state=False)
    want = call.expected()
    o, state = _run(call.cast(np.dtype(np.float16)), output_final_state=True)
    assert o.dtype == np.float16 and state.dtype == np.float32
    assert_close(o, want[0], dtype="float16", form="recurrent")


_SANITIZED = """
import numpy as np, fastweights
from fastweights.testing import assert_close, load_golden_cases, random_call, run_steps
for case in load_golden_cases():
    if case.op not in ("dplr", "iplr", "rwkv7"):
        continue
    c = case.cast(np.float32)
    o, s = c.run(getattr(fastweights, c.op), output_final_state=case.has_final_state,
                 backend="cupy")
    case.check(o, s if case.has_final_state else None, dtype="float32", form="recurrent")
for K, V in ((5, 40), (100, 33)):
    call = random_call("dplr", seed=1, batch=1, length=3, key_dim=K, value_dim=V, groups=2,
                       seqlens=[2, 0, 1], use_qk_l2norm=True)
    got = call.run(fastweights.dplr, output_final_state=True, backend="cupy")
    assert_close(got[0], call.expected()[0], dtype="float64", form="recurrent")
call = random_call("iplr", seed=2, batch=2, length=3)
pool = np.zeros((4, *call.arrays["initial_state"].shape[1:]))
pool[[3, 1]] = call.arrays["initial_state"]
run_steps(call, pool, state_indices=np.array([3, 1]), backend="cupy")
print("sanitized run ok")
"""


@pytest.mark.slow
def test_under_address_sanitizer():
    """No out-of-bounds access in the DPLR kernel (golden2 cases, tails, packed, decoding)."""
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


def test_golden2_cases_are_covered():
    names = {c.name for c in load_golden_cases() if c.op in OPS}
    assert {"dplr_basic", "iplr_basic", "rwkv7_basic"} <= names
