"""The numba backend: golden cases and the conformance suite in every form it offers, plus
shapes and paths the generic suites do not reach (full and partial value blocks of 64
columns, renormalisation of the running decay, resets at the first token, in-place decoding
of large states, strided and float16 inputs) and the import/compile-time promises."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from _support import implemented_as

import fastweights
from fastweights.testing import (
    assert_close,
    load_golden_cases,
    parametrize_checks,
    random_call,
    run_steps,
)

numba = pytest.importorskip("numba")

BACKEND = "numba"
INFO = next(b for b in fastweights.backends.list_backends() if b.name == BACKEND)
CASES = load_golden_cases()


def _forms(case: Any) -> list[str]:
    return case.forms(INFO.ops.get(implemented_as(case.op), ()))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("case", "form"),
    [pytest.param(c, f, id=f"{c.name}-{f}") for c in CASES for f in _forms(c)],
)
def test_golden(case: Any, form: str, dtype: str) -> None:
    call = case.cast(np.dtype(dtype))
    fn = getattr(fastweights, case.op)
    o, final = call.run(fn, backend=BACKEND, form=form, output_final_state=case.has_final_state)
    case.check(o, final, dtype=dtype, form=form)


@pytest.mark.parametrize("check", parametrize_checks(BACKEND))
def test_conformance(check: Any) -> None:
    check()


def _compare(call: Any, dtype: str = "float64", **extra: Any) -> None:
    want = call.expected()
    got = call.cast(np.dtype(dtype)).run(
        getattr(fastweights, call.op), backend=BACKEND, output_final_state=True, **extra
    )
    form = extra.get("form", "recurrent")
    assert_close(got[0], want[0], dtype=dtype, form=form, name="o")
    if isinstance(want[1], tuple):
        for g, w in zip(got[1], want[1], strict=True):
            assert_close(g, w, dtype=dtype, form=form, name="state")
    else:
        assert_close(got[1], want[1], dtype=dtype, form=form, name="state")


OPS = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda")


FORMS = ("recurrent", "chunk")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("value_dim", [64, 100, 130])
@pytest.mark.parametrize("op", OPS)
def test_value_blocks(op: str, value_dim: int, dtype: str, form: str) -> None:
    """Full blocks (loaded and stored by the fused first and last passes) and partial ones."""
    call = random_call(op, seed=1, batch=2, length=45, key_dim=20, value_dim=value_dim)
    _compare(call, dtype, form=form, chunk_size=16)


@pytest.mark.parametrize("value_dim", [64, 128, 130])
@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule", "kda"])
def test_per_value_beta_in_full_blocks_of_packed_sequences(op: str, value_dim: int) -> None:
    """Full value blocks read v and beta and write o in place (no copies), packed or not."""
    call = random_call(
        op, seed=9, seqlens=[5, 0, 37, 18], key_dim=24, value_dim=value_dim, beta_per_value=True
    )
    _compare(call, "float32", form="recurrent")
    _compare(call, "float64", form="recurrent")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gates", ["strong", "reset", "zero"])
@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule", "kda", "delta_product"])
def test_renormalisation_and_resets(op: str, gates: str, form: str) -> None:
    """Strong gates renormalise the running decay every few steps; -inf resets."""
    call = random_call(op, seed=2, length=70, value_dim=66, key_dim=9, gates=gates)
    if gates == "reset" and "g" in call.arrays:
        call.arrays["g"][:, 0] = -np.inf  # a reset at the very first token
    if gates == "reset" and "gk" in call.arrays:
        call.arrays["gk"][:, 0, :, 3] = -np.inf
    _compare(call, form=form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("op", (*OPS, "delta_product"))
def test_packed_sequences_with_empty_and_long_ones(op: str, form: str) -> None:
    call = random_call(op, seed=3, seqlens=[0, 1, 40, 0, 23], value_dim=70, key_dim=16)
    _compare(call, form=form, chunk_size=16)


@pytest.mark.parametrize("op", ["gated_delta_rule", "kda", "linear_attn"])
def test_decoding_large_state_in_place(op: str) -> None:
    call = random_call(op, seed=4, batch=3, length=6, heads=2, key_dim=32, value_dim=128)
    call = call.cast(np.float32)
    pool = np.zeros((5, 2, 32, 128), np.float32)
    idx = np.array([4, 0, 2])
    got = run_steps(call, pool, state_indices=idx, backend=BACKEND)
    assert got.in_place and got.state is pool
    arrays = {**call.arrays, "initial_state": np.zeros_like(call.arrays["initial_state"])}
    want = replace(call, arrays=arrays).run(
        getattr(fastweights, op), backend="reference", output_final_state=True
    )
    assert_close(got.o, want[0], dtype="float32", form="recurrent", name="o")
    assert_close(pool[idx], want[1], dtype="float32", form="recurrent", name="pool")
    assert not pool[1].any() and not pool[3].any()


def test_decoding_pool_of_another_dtype_and_normalize() -> None:
    rng = np.random.default_rng(5)
    q, k = rng.uniform(0.1, 1, (2, 2, 1, 8))
    v = rng.standard_normal((2, 1, 70))
    pool = (np.zeros((3, 1, 8, 70), np.float32), np.zeros((3, 1, 8), np.float32))
    ref_pool = (np.zeros((3, 1, 8, 70)), np.zeros((3, 1, 8)))
    idx = [2, 0]
    for _ in range(3):
        o, out = fastweights.step.linear_attn(
            q, k, v, pool, normalize=True, state_indices=idx, backend=BACKEND
        )
        ref, _ = fastweights.step.linear_attn(
            q, k, v, ref_pool, normalize=True, state_indices=idx, backend="reference"
        )
        assert out is pool and pool[0].dtype == np.float32
        np.testing.assert_allclose(o, ref, rtol=1e-6)
    np.testing.assert_allclose(pool[0], ref_pool[0], rtol=1e-6)
    np.testing.assert_allclose(pool[1], ref_pool[1], rtol=1e-6)


def test_strided_and_float16_inputs() -> None:
    call = random_call("gated_delta_rule", seed=6, length=33, key_dim=16, value_dim=80)
    a = call.arrays
    fused = np.concatenate([a["q"], a["k"]], axis=-1)  # q, k as views of a fused projection
    v_t = np.ascontiguousarray(np.swapaxes(a["v"], -1, -2)).swapaxes(-1, -2)  # strided last axis
    args = (fused[..., :16], fused[..., 16:], v_t, a["g"], a["beta"])
    o, s = fastweights.gated_delta_rule(
        *args, initial_state=a["initial_state"], output_final_state=True, backend=BACKEND
    )
    want = call.expected()
    assert_close(o, want[0], dtype="float64", form="recurrent")
    assert_close(s, want[1], dtype="float64", form="recurrent")
    half = [x.astype(np.float16) for x in args]
    o16, s16 = fastweights.gated_delta_rule(*half, output_final_state=True, backend=BACKEND)
    ref = fastweights.gated_delta_rule(
        *[x.astype(np.float64) for x in half], output_final_state=True, backend="reference"
    )
    assert o16.dtype == np.float16 and s16.dtype == np.float32
    assert_close(o16, ref[0], dtype="float16", form="recurrent")


def test_chosen_automatically_for_numpy_arrays() -> None:
    from fastweights._registry import select
    from fastweights._validate import validate

    x = np.zeros((1, 4, 1, 8), np.float32)
    assert select(validate("linear_attn", x, x, x), None).name == BACKEND


def _python(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return out.stdout.strip()


def test_importing_fastweights_imports_no_numba() -> None:
    code = (
        "import sys, fastweights; fastweights.backends.list_backends(); "
        "print('numba' in sys.modules)"
    )
    assert _python(code) == "False"


@pytest.mark.slow
def test_pure_python_mode() -> None:
    """``NUMBA_DISABLE_JIT=1`` (a coverage run) executes the kernels as Python."""
    code = (
        "import numpy as np, fastweights\n"
        "from fastweights.testing import random_call, assert_close\n"
        "for op in ('gated_delta_rule', 'kda', 'linear_attn'):\n"
        "    call = random_call(op, seed=7, length=20, key_dim=6, value_dim=67)\n"
        "    want = call.expected()\n"
        "    for form in ('recurrent', 'chunk'):\n"
        "        got = call.run(getattr(fastweights, op), backend='numba', form=form,\n"
        "                       chunk_size=8, output_final_state=True)\n"
        "        assert_close(got[0], want[0], dtype='float64', form=form)\n"
        "print('ok')\n"
    )
    assert _python(code, NUMBA_DISABLE_JIT="1") == "ok"


def _inside(addr: int, arrays: list[np.ndarray]) -> bool:
    return any(a.ctypes.data <= addr < a.ctypes.data + a.nbytes for a in arrays)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_sub", [1, 2])
@pytest.mark.parametrize("gate_width", [0, 1, 13])
@pytest.mark.parametrize("beta_width", [0, 1, 130])
def test_prefetch_list_fits_and_stays_inside_the_inputs(
    beta_width: int, gate_width: int, n_sub: int, dtype: Any
) -> None:
    """The kernels prefetch from a list of line addresses: it must fit its buffer (the kernel
    writes it without bounds checks) and name only lines of the arrays a chunk reads."""
    from fastweights.backends.numba import recurrent
    from fastweights.backends.numba._jit import DISABLE_JIT
    from fastweights.backends.numba._layout import dummy

    B, T, H, HV, K, V = 2, 40, 2, 4, 13, 130
    R, TC = T * n_sub, recurrent.TC
    rng = np.random.default_rng(0)

    def arr(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    q, k, v, o = arr(B, T, H, K), arr(B, R, H, K), arr(B, R, HV, V), arr(B, T, HV, V)
    gate = arr(B, T, HV, gate_width) if gate_width else dummy(dtype)
    beta = arr(B, R, HV, beta_width) if beta_width else dummy(dtype)
    inputs = [q, k, v, o, gate, beta]
    for c0, c1 in ((0, 64), (64, 130), (128, 130), (0, 130)):
        cap = recurrent.prefetch_capacity(K, c1 - c0, np.dtype(dtype).itemsize)
        for r0 in (0, 3, R - TC):
            PFA = np.full(2 * cap, -1, np.int64)  # room to see an overflow, not crash
            n = recurrent._prefetch_lines(
                q, k, v, gate, beta, o, 1, 1, 3, 0, 0, r0, TC, n_sub, c0, c1, PFA
            )
            assert 0 < n <= cap
            assert (PFA[n:] == -1).all()
            if not DISABLE_JIT:
                assert all(_inside(int(a), inputs) for a in PFA[:n])
                listed = set(PFA[:n].tolist())
                for r in range(r0, r0 + TC):
                    assert v[1, r, 3, c0:].ctypes.data in listed
                    assert k[1, r, 1, :].ctypes.data in listed
