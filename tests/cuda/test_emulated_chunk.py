"""The ``cupy`` backend's chunk-form kernels (``kernels/chunk.cu``), run on the CPU by the emulator.

Every golden case of the delta family that has a chunk form, in float64 and float32, under two
thread orders (forward and reverse: a missing ``__syncthreads`` changes the result), at the
chunk form's SPEC tolerances; then the cases the chunk form makes hard: ``T`` not a multiple of
the chunk, chunk sizes of 1 and of the kernels' capacity, packed sequences with empty ones,
``-inf`` gates per head and per key channel (a NaN does not leak across a reset), decays far
below ``exp(-88)`` inside one chunk, grouped value heads, ``use_qk_l2norm``, float16 inputs,
and the ``auto`` plan (recurrent for decoding and short prompts, chunk for long ones).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from _support import implemented_as

import fastweights
from fastweights.backends import get_backend
from fastweights.backends.cupy import chunk_plan
from fastweights.backends.cupy._chunk import CHUNK
from fastweights.testing import assert_close, load_golden_cases, random_call

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(
        shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None, reason="g++ is not on PATH"
    ),
]

GOLDEN = [
    c
    for c in load_golden_cases()
    if "chunk" in get_backend("cupy").ops.get(implemented_as(c.op), ())
    and c.unavailable_form("chunk") is None
]
OPS = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda", "delta_product")


@pytest.fixture(params=["forward", "reverse"])
def two_orders(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CUDASIM_ORDER", request.param)
    return str(request.param)


def _chunk(call, chunk_size=64, **kw):
    return call.run(
        getattr(fastweights, call.op),
        backend="cupy",
        form="chunk",
        chunk_size=chunk_size,
        output_final_state=True,
        **kw,
    )


def _check(got, want, dtype):
    assert_close(got[0], want[0], dtype=dtype, form="chunk", name="o")
    finals = got[1] if isinstance(got[1], tuple) else (got[1],)
    refs = want[1] if isinstance(want[1], tuple) else (want[1],)
    for fin, ref in zip(finals, refs, strict=True):
        assert_close(fin, ref, dtype=dtype, form="chunk", name="state")


def test_golden_cases_cover_every_op():
    assert {implemented_as(c.op) for c in GOLDEN} == set(OPS)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", GOLDEN, ids=[c.name for c in GOLDEN])
def test_golden_case(case, dtype, emulate, two_orders):
    o, final = case.cast(np.dtype(dtype)).run(
        getattr(fastweights, case.op),
        backend="cupy",
        form="chunk",
        chunk_size=16,
        output_final_state=case.has_final_state,
    )
    assert o.dtype == np.dtype(dtype)
    case.check(o, final if case.has_final_state else None, dtype=dtype, form="chunk")


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
@pytest.mark.parametrize("op", OPS)
def test_ragged_chunks(op, chunk_size, emulate):
    """T = 37 rows (74 for DeltaProduct) in chunks that do not divide it."""
    call = random_call(
        op, seed=chunk_size, batch=2, length=37, key_dim=20, value_dim=9, gates="reset"
    )
    _check(_chunk(call, chunk_size), call.expected(), "float64")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gates", ["strong", "reset", "zero"])
@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule", "kda"])
def test_gates(op, gates, dtype, emulate):
    """Decays of exp(-3)..exp(-8) per step (down to exp(-500) within a chunk), resets, and
    gates of exactly 0, in the largest chunk of the dtype."""
    call = random_call(op, seed=4, batch=1, length=70, key_dim=18, value_dim=5, gates=gates)
    got = _chunk(call.cast(np.dtype(dtype)), CHUNK[dtype])
    _check(got, call.expected(), dtype)


@pytest.mark.parametrize("op", ["gated_delta_rule", "kda", "delta_product", "linear_attn"])
def test_packed_grouped_l2norm(op, emulate):
    call = random_call(
        op,
        seed=6,
        seqlens=[0, 19, 1, 0, 40],
        groups=2,
        key_dim=33,
        value_dim=20,
        use_qk_l2norm=op != "linear_attn",
        normalize=op == "linear_attn",
        gates="reset",
    )
    _check(_chunk(call, 16), call.expected(), "float64")


def test_float16_inputs(emulate):
    call = random_call("kda", seed=7, batch=1, length=50, key_dim=16, value_dim=8)
    o, state = _chunk(call.cast(np.dtype("float16")), 32)
    assert o.dtype == np.float16 and state.dtype == np.float32
    want = call.expected()
    assert_close(o, want[0], dtype="float16", form="chunk", name="o")
    assert_close(state, want[1], dtype="float16", form="chunk", name="state")


@pytest.mark.parametrize("gate_kind", ["g", "gk"])
def test_nan_does_not_leak_across_a_reset(gate_kind, emulate):
    op = "gated_delta_rule" if gate_kind == "g" else "kda"
    call = random_call(op, seed=10, batch=1, length=40, gates="normal")
    a = dict(call.arrays)
    a[gate_kind] = a[gate_kind].copy()
    a[gate_kind][0, 20, :] = -np.inf
    a["v"] = a["v"].copy()
    a["v"][0, 9, 0, 0] = np.nan
    args = (a["q"], a["k"], a["v"], a[gate_kind], a["beta"])
    kw = {"initial_state": a["initial_state"], "output_final_state": True, "chunk_size": 16}
    o, state = getattr(fastweights, op)(*args, **kw, backend="cupy", form="chunk")
    ref = getattr(fastweights, op)(*args, **kw, backend="reference", form="recurrent")
    assert np.isfinite(o[0, :9]).all() and np.isnan(o[0, 9:20, 0]).any()
    assert np.isfinite(o[0, 20:]).all() and np.isfinite(state).all()
    assert_close(o[0, 20:], ref[0][0, 20:], dtype="float64", form="chunk")
    assert_close(state, ref[1], dtype="float64", form="chunk")


def _plan(op="gated_delta_rule", **kw):
    call = random_call(op, seed=0, **kw)
    args, kwargs = call.arguments()
    return fastweights.plan(getattr(fastweights, op), *args, **kwargs, backend="cupy")


def test_auto_plan(emulate):
    short = _plan(batch=1, length=100)
    assert short.form == "recurrent" and "short" in short.why
    long = _plan(batch=1, length=130)
    assert long.form == "chunk" and long.params["chunk_size"] == CHUNK["float64"]
    assert _plan("delta_product", batch=1, length=64).form == "chunk"  # 128 rows
    assert _plan(batch=1, length=200, beta_per_value=True).form == "recurrent"
    assert _plan(seqlens=[100, 200]).form == "chunk"
    assert _plan(seqlens=[100, 50]).form == "recurrent"
    # 64 sequences x 16 heads x 1 value tile = 1024 recurrent blocks: the card is full.
    full = _plan(batch=64, heads=16, length=130, key_dim=4, value_dim=4)
    assert full.form == "recurrent" and "fills" in full.why
    assert _plan(batch=64, heads=16, length=1100, key_dim=4, value_dim=4).form == "chunk"
    assert chunk_plan.__doc__ is not None


def test_auto_runs_the_chunk_kernels(emulate, monkeypatch):
    from fastweights.backends.cupy import _chunk as chunk_module

    ran = []
    original = chunk_module.run

    def spy(call):
        ran.append(call.op)
        return original(call)

    monkeypatch.setattr(chunk_module, "run", spy)
    call = random_call("gla", seed=11, batch=1, length=130, key_dim=8, value_dim=4)
    got = call.run(fastweights.gla, backend="cupy", output_final_state=True)
    assert ran == ["gla"]
    _check(got, call.expected(), "float64")


_SANITIZED = """
import numpy as np, fastweights
from fastweights.testing import assert_close, random_call
for op, kw in [
    ("gated_delta_rule", dict(seqlens=[0, 19, 1, 40], groups=2, gates="reset")),
    ("kda", dict(batch=1, length=70, key_dim=40, value_dim=20, use_qk_l2norm=True)),
    ("gla", dict(batch=2, length=33, gates="reset")),
    ("delta_rule", dict(batch=1, length=20, key_dim=3, value_dim=33)),
    ("linear_attn", dict(batch=1, length=65, normalize=True, key_dim=17)),
]:
    call = random_call(op, seed=1, **kw).cast(np.float32)
    got = call.run(getattr(fastweights, op), backend="cupy", form="chunk", output_final_state=True)
    assert_close(got[0], call.expected()[0], dtype="float32", form="chunk")
print("sanitized run ok")
"""


@pytest.mark.slow
def test_chunk_kernels_under_address_sanitizer():
    """No out-of-bounds access in any mode (tails of K, V, chunks; packed; grouped)."""
    import subprocess
    import sys

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


@pytest.mark.parametrize(
    ("op", "K", "V", "dtype"),
    [("kda", 128, 40, "float32"), ("gated_delta_rule", 200, 70, "float64")],
)
def test_wide_heads(op, K, V, dtype, emulate):
    """Key sizes of the gpu-check shape and above (several key tiles, two value tiles)."""
    call = random_call(
        op,
        seed=K,
        batch=1,
        length=45,
        heads=1,
        groups=2,
        key_dim=K,
        value_dim=V,
        use_qk_l2norm=True,
        gates="reset",
    )
    _check(_chunk(call.cast(np.dtype(dtype))), call.expected(), dtype)
