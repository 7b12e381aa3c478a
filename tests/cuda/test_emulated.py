"""The ``cupy`` backend's CUDA kernels, run on the CPU by the emulator (no GPU needed).

``FASTWEIGHTS_CUDA_EMULATE=1`` makes the backend accept NumPy arrays and launch the unchanged
kernel source through :mod:`fastweights.backends.cupy.emulator`. Checked: every golden case in
float64 and float32 under three thread orders, the conformance suite of
:mod:`fastweights.testing` (float64, float32, float16: golden cases, odd shapes, packed
sequences, resets, streaming, decoding in a permuted pool, non-contiguous inputs, errors),
every register tile, the decoding fallbacks, mixed dtypes, the float16 conversions bit for bit,
and one AddressSanitizer and one ThreadSanitizer pass in subprocesses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _support import implemented_as

import fastweights
import fastweights.rules.delta
import fastweights.step
from fastweights.backends import get_backend
from fastweights.testing import (
    assert_close,
    check_backend,
    load_golden_cases,
    random_call,
    run_steps,
)

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(
        shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None, reason="g++ is not on PATH"
    ),
]

HERE = Path(__file__).resolve().parent
GOLDEN = [c for c in load_golden_cases() if implemented_as(c.op) in get_backend("cupy").ops]


def _run(call, **kw):
    return call.run(getattr(fastweights, call.op), backend="cupy", **kw)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", GOLDEN, ids=[c.name for c in GOLDEN])
def test_golden_case(case, dtype, emulate, order):
    o, final = _run(case.cast(np.dtype(dtype)), output_final_state=case.has_final_state)
    assert o.dtype == np.dtype(dtype)
    case.check(o, final if case.has_final_state else None, dtype=dtype, form="recurrent")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_conformance_suite(dtype, emulate):
    check_backend("cupy", dtypes=(dtype,))


@pytest.mark.parametrize("op", ["linear_attn", "gla", "gated_delta_rule", "delta_product"])
def test_decoding_equals_sequence(op, emulate, order):
    normalize = op == "linear_attn"
    call = random_call(op, seed=3, batch=3, length=5, groups=2, normalize=normalize)
    want = call.expected()
    s0 = call.arrays["initial_state"]
    parts = s0 if normalize else (s0,)
    idx = np.array([4, 0, 2])
    pools = []
    for part in parts:
        pool = np.full((5, *part.shape[1:]), 7.0)
        pool[idx] = part
        pools.append(pool)
    state = tuple(pools) if normalize else pools[0]
    got = run_steps(call, state, state_indices=idx, backend="cupy")
    assert got.in_place
    assert_close(got.o, want[0], dtype="float64", form="recurrent")
    finals = got.state if normalize else (got.state,)
    for fin, ref, pool in zip(finals, want[1] if normalize else (want[1],), pools, strict=True):
        assert_close(fin[idx], ref, dtype="float64", form="recurrent")
        np.testing.assert_array_equal(np.delete(pool, idx, axis=0), 7.0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("K", "V"), [(5, 40), (33, 1), (100, 70), (200, 9)])
@pytest.mark.parametrize("op", ["kda", "gated_delta_rule", "delta_product"])
def test_every_register_tile(op, K, V, dtype, emulate):
    """Key sizes of every tile (8, 64, 128, 256 rows), value tails and several V tiles."""
    call = random_call(
        op,
        seed=K + V,
        batch=1,
        length=4,
        heads=1,
        groups=2,
        key_dim=K,
        value_dim=V,
        use_qk_l2norm=op == "kda",
        beta_per_value=op == "gated_delta_rule",
    )
    want = call.expected()
    got = _run(call.cast(np.dtype(dtype)), output_final_state=True)
    assert_close(got[0], want[0], dtype=dtype, form="recurrent", name="o")
    assert_close(got[1], want[1], dtype=dtype, form="recurrent", name="state")


def test_packed_batch_with_empty_sequences(emulate):
    call = random_call("gated_delta_rule", seed=5, seqlens=[0, 3, 0, 1, 6], gates="reset")
    want = call.expected()
    o, final = _run(call, output_final_state=True)
    assert_close(o, want[0], dtype="float64", form="recurrent")
    assert_close(final, want[1], dtype="float64", form="recurrent")
    np.testing.assert_array_equal(final[0], call.arrays["initial_state"][0])


def test_decoding_pool_of_another_dtype_or_layout(emulate):
    """A float32 pool with float64 inputs, and a non-contiguous pool, are still in place."""
    call = random_call("kda", seed=8, batch=2, length=3)
    want = call.expected()
    s0 = call.arrays["initial_state"]
    pool32 = s0.astype(np.float32)
    got = run_steps(call, pool32, backend="cupy")
    assert got.in_place and got.state.dtype == np.float32
    assert_close(got.state, want[1], dtype="float32", form="recurrent")
    assert_close(got.o, want[0], dtype="float32", form="recurrent")
    wide = np.zeros((*s0.shape[:-1], s0.shape[-1] + 3))
    view = wide[..., 1:-2]
    view[...] = s0
    got = run_steps(call, view, backend="cupy")
    assert got.in_place
    assert_close(wide[..., 1:-2], want[1], dtype="float64", form="recurrent")
    assert not wide[..., :1].any() and not wide[..., -2:].any()


def test_mixed_input_dtypes(emulate):
    call = random_call("gated_delta_rule", seed=9, length=6, initial_state=False)
    a = call.arrays
    q, k = a["q"].astype(np.float16), a["k"].astype(np.float16)
    v, g, beta = a["v"].astype(np.float32), a["g"].astype(np.float16), a["beta"]
    o, state = fastweights.gated_delta_rule(
        q, k, v, g, beta.astype(np.float32), output_final_state=True, backend="cupy"
    )
    assert o.dtype == np.float32 and state.dtype == np.float32
    ref = fastweights.gated_delta_rule(
        *(x.astype(np.float64) for x in (q, k, v, g)), beta, output_final_state=True
    )
    assert_close(o, ref[0], dtype="float32", form="recurrent")
    o16, _ = fastweights.gated_delta_rule(q, k, v.astype(np.float16), g, beta, backend="cupy")
    assert o16.dtype == np.float16


def test_nan_propagates_like_the_oracle(emulate):
    call = random_call("gated_delta_rule", seed=10, batch=1, length=8, gates="reset")
    a = dict(call.arrays)
    a["g"] = a["g"].copy()
    a["g"][0, 4, :] = -np.inf
    a["v"] = a["v"].copy()
    a["v"][0, 2, 0, 0] = np.nan
    args = (a["q"], a["k"], a["v"], a["g"], a["beta"])
    kw = {"initial_state": a["initial_state"], "output_final_state": True}
    o, state = fastweights.gated_delta_rule(*args, **kw, backend="cupy")
    ref = fastweights.gated_delta_rule(*args, **kw, backend="reference", form="recurrent")
    # A NaN at token 2 spreads until the reset at token 4 clears the state (API.md).
    assert np.isfinite(o[0, :2]).all() and np.isnan(o[0, 2:4, 0, 0]).all()
    assert np.isfinite(o[0, 4:]).all() and np.isfinite(o[0, :, 1]).all()
    assert_close(o, ref[0], dtype="float64", form="recurrent")
    assert_close(state, ref[1], dtype="float64", form="recurrent")


def test_backend_contract_without_gpu(monkeypatch):
    from fastweights.backends import list_backends
    from fastweights.backends.cupy import backend

    monkeypatch.delenv("FASTWEIGHTS_CUDA_EMULATE", raising=False)
    info = next(b for b in list_backends() if b.name == "cupy")
    first_wave = {rule.name for rule in fastweights.rules.delta.RULES if rule.parent is None}
    assert info.ops == {
        **{op: ("recurrent", "chunk") for op in first_wave},
        **{op: ("recurrent",) for op in ("dplr", "recurrent_delta_rule", "srwm")},
    }
    assert set(info.step_ops) == {*first_wave, "dplr", "recurrent_delta_rule", "srwm"}
    assert info.priority > next(b.priority for b in list_backends() if b.name == "reference")
    call = random_call("delta_rule", length=2)
    args, kwargs = call.arguments()
    if backend.unavailable() is not None:
        with pytest.raises(TypeError, match="cupy"):
            fastweights.delta_rule(*args, **kwargs, backend="cupy")
    o, _ = fastweights.delta_rule(*args, **kwargs)  # falls back to another backend
    assert o.shape == call.arrays["v"].shape
    monkeypatch.setenv("FASTWEIGHTS_CUDA_EMULATE", "1")
    with pytest.raises(TypeError, match=r"K = 1\.\.256"):
        big = random_call("delta_rule", length=1, key_dim=257, batch=1, heads=1)
        fastweights.delta_rule(*big.arguments()[0], backend="cupy")


def _half_module():
    from fastweights.backends.cupy import _launch
    from fastweights.backends.cupy.emulator import RawModule

    src = _launch.source() + textwrap.dedent(
        """
        extern "C" __global__ void half_io(const fw_half* h, float* f, const float* x,
                                           fw_half* hx, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) { f[i] = fw_half_to_float(h[i].bits); hx[i].bits = fw_float_to_half(x[i]); }
        }
        """
    )
    return RawModule(src, _launch.OPTIONS).get_function("half_io")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_float16_conversions_bit_exact():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = bits.view(np.float16)
    rng = np.random.default_rng(0)
    edges = np.array(
        [
            65504,
            65519.996,
            65520,
            65536,
            1e30,
            np.inf,
            -np.inf,
            np.nan,
            0.0,
            -0.0,
            2**-24,
            2**-25,
            1.5 * 2**-25,
            2**-14,
            2**-14 - 2**-25,
            1 + 2**-11,
            1 + 3 * 2**-11,
        ],
        dtype=np.float32,
    )
    x = np.concatenate(
        [
            edges,
            -edges,
            halves.astype(np.float32),
            rng.standard_normal(4096).astype(np.float32)
            * np.float32(10.0) ** rng.integers(-9, 6, 4096),
        ]
    ).astype(np.float32)
    n = max(len(halves), len(x))
    h_in = np.zeros(n, np.float16)
    h_in[: len(halves)] = halves
    x_in = np.zeros(n, np.float32)
    x_in[: len(x)] = x
    f, hx = np.zeros(n, np.float32), np.zeros(n, np.float16)
    _half_module()((-(-n // 256),), (256,), (h_in, f, x_in, hx, np.int32(n)))
    want = halves.astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(
        f[: len(halves)].view(np.uint32)[~nan], want.view(np.uint32)[~nan]
    )
    assert np.isnan(f[: len(halves)][nan]).all()
    want16 = x.astype(np.float16)
    nan16 = np.isnan(want16)
    got16 = hx[: len(x)]
    np.testing.assert_array_equal(got16.view(np.uint16)[~nan16], want16.view(np.uint16)[~nan16])
    assert np.isnan(got16[nan16]).all()


_SANITIZED = """
import sys, numpy as np, fastweights
from fastweights.testing import assert_close, load_golden_cases, random_call, run_steps
CASES, SHAPES = (slice(None), ((5, 40), (100, 33))) if sys.argv[1] == "address" else (
    slice(8, 11), ((5, 40),))
for case in load_golden_cases()[CASES]:
    if case.op not in fastweights.backends.get_backend("cupy").ops:
        continue
    c = case.cast(np.float32)
    o, s = c.run(getattr(fastweights, c.op), output_final_state=case.has_final_state,
                 backend="cupy")
    case.check(o, s if case.has_final_state else None, dtype="float32", form="recurrent")
for K, V in SHAPES:
    call = random_call("kda", seed=1, batch=1, length=3, key_dim=K, value_dim=V, groups=2,
                       seqlens=[2, 0, 1], beta_per_value=True)
    want = call.expected()
    got = call.run(fastweights.kda, output_final_state=True, backend="cupy")
    assert_close(got[0], want[0], dtype="float64", form="recurrent")
call = random_call("delta_product", seed=2, batch=2, length=3)
pool = np.zeros((4, *call.arrays["initial_state"].shape[1:]))
pool[[3, 1]] = call.arrays["initial_state"]
run_steps(call, pool, state_indices=np.array([3, 1]), backend="cupy")
print("sanitized run ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["address", "thread"])
def test_kernels_under_sanitizer(kind):
    """AddressSanitizer: no out-of-bounds access; ThreadSanitizer: no shared-memory race."""
    lib = "asan" if kind == "address" else "tsan"
    path = subprocess.run(
        ["gcc", f"-print-file-name=lib{lib}.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not os.path.isabs(path):
        pytest.skip(f"gcc has no lib{lib}")
    cxx = subprocess.run(
        ["gcc", "-print-file-name=libstdc++.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    env = dict(
        os.environ,
        FASTWEIGHTS_CUDA_EMULATE="1",
        CUDASIM_CXXFLAGS=f"-fsanitize={kind}",
        LD_PRELOAD=f"{path} {cxx}",
        ASAN_OPTIONS="detect_leaks=0",
    )
    code = _SANITIZED
    if kind == "thread":  # real threads for TSan; fewer cases, they are slow
        env["CUDASIM_MODE"] = "threads"
        code = code.replace(
            "for case in load_golden_cases():", "for case in load_golden_cases()[8:12]:"
        )
    r = subprocess.run(
        [sys.executable, "-c", _SANITIZED, kind],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert "Sanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0 and "sanitized run ok" in r.stdout, r.stderr[-4000:]
