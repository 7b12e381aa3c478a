"""The numba chunk form on every chunk size the API accepts and on odd shapes, and its
handling of NaN, Inf and hard resets (API.md, "Tensors and layout").

Every result is compared with the float64 naive loop. These tests also run under
``NUMBA_BOUNDSCHECK=1``, the checked raw-pointer build and ``NUMBA_DISABLE_JIT=1`` (kernels as
Python; the two tests of 1024-row chunks and of compiled allocations skip there).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastweights
from fastweights.testing import Call, assert_close, random_call

numba = pytest.importorskip("numba")

from fastweights.backends.numba._jit import DISABLE_JIT  # noqa: E402
from fastweights.backends.numba.chunk import MAX_CHUNK  # noqa: E402

# Inf arithmetic (0 * inf, inf - inf) in the naive loop makes NumPy warn.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

OPS = (
    "linear_attn",
    "simple_gla",
    "retention",
    "gla",
    "delta_rule",
    "gated_delta_rule",
    "kda",
    "delta_product",
)
DTYPES = ("float32", "float64")
GATE = {"simple_gla": "g", "gated_delta_rule": "g", "delta_product": "g", "gla": "gk", "kda": "gk"}

# (T, K, V, chunk_size, groups): T, K, V and C each take 1, 2, 3, 15, 16, 17, 63, 64, 65;
# chunk sizes above T (and 10**9, issue 11 item 5) run one chunk of T rows.
SIZES = [
    (1, 8, 4, 1, 1),
    (2, 1, 1, 1, 2),
    (3, 17, 2, 2, 1),
    (17, 3, 15, 1, 1),
    (15, 16, 3, 2, 2),
    (65, 2, 17, 16, 1),
    (16, 65, 1, 15, 1),
    (63, 15, 16, 64, 2),
    (64, 2, 65, 63, 1),
    (65, 63, 2, 17, 1),
    (17, 2, 64, 65, 1),
    (5, 3, 2, 10**9, 2),
]
# The quick subset (-m "not slow") runs the first four and the 10**9 chunk.
SIZES = [
    size if i < 4 or size[3] == 10**9 else pytest.param(*size, marks=pytest.mark.slow)
    for i, size in enumerate(SIZES)
]


def _numba(call: Call, dtype: str, chunk_size: int) -> tuple[np.ndarray, Any]:
    return call.cast(np.dtype(dtype)).run(
        getattr(fastweights, call.op),
        backend="numba",
        form="chunk",
        chunk_size=chunk_size,
        output_final_state=True,
    )


def _check(call: Call, dtype: str, chunk_size: int, name: str = "") -> None:
    """The numba chunk form against the float64 naive loop."""
    want = call.expected()
    got = _numba(call, dtype, chunk_size)
    assert_close(got[0], want[0], dtype=dtype, form="chunk", name=f"{name} o")
    pairs = zip(got[1], want[1], strict=True) if isinstance(want[1], tuple) else [(got[1], want[1])]
    for g, w in pairs:
        assert_close(g, w, dtype=dtype, form="chunk", name=f"{name} state")


def _with(call: Call, **arrays: Any) -> Call:
    return dataclasses.replace(call, arrays={**call.arrays, **arrays})


# -- every chunk size, odd shapes --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "K", "V", "C", "groups"), SIZES)
@pytest.mark.parametrize("op", OPS)
def test_odd_sizes(op: str, T: int, K: int, V: int, C: int, groups: int, dtype: str) -> None:
    """Scratch buffers and loop bounds hold for chunk sizes 1, 2, ..., odd T, K, V."""
    call = random_call(
        op, seed=T + K + V, batch=2, length=T, heads=1, groups=groups, key_dim=K, value_dim=V
    )
    _check(call, dtype, C)


@pytest.mark.parametrize("C", [1, 2, 15, 64])
@pytest.mark.parametrize("op", OPS)
def test_packed_sequences(op: str, C: int) -> None:
    """Empty, length-1 and chunk-crossing packed sequences, three Householder rows per token."""
    seqlens = [0, 1, 17, 0, 2, 65]
    call = random_call(op, seed=C, seqlens=seqlens, key_dim=17, value_dim=3, num_householder=3)
    for dtype in DTYPES:
        _check(call, dtype, C, name=dtype)


def test_normalized_linear_attention() -> None:
    """``normalize=True`` adds a value column of ones: V + 1 columns in every scratch."""
    call = random_call("linear_attn", seed=5, length=17, key_dim=3, value_dim=1, normalize=True)
    for C in (1, 2, 16):
        _check(call, "float64", C)


@pytest.mark.slow
def test_chunk_size_one_does_not_corrupt_memory() -> None:
    """Issue 11 item 1: ``gla``/``kda`` with ``chunk_size=1`` wrote past a ``[3, C, K]`` scratch
    (the process then aborted or segfaulted, in a later allocation)."""
    code = (
        "import gc, numpy as np, fastweights as fw\n"
        "from fastweights.testing import naive\n"
        "beta = np.full((1, 1, 1), 0.5)\n"
        "for K in (8, 16, 33, 8):\n"
        "    q = k = np.ones((1, 1, 1, K)); v = np.ones((1, 1, 1, 4))\n"
        "    gk = np.full((1, 1, 1, K), -0.1)\n"
        "    for _ in range(20):\n"
        "        o, _ = fw.gla(q, k, v, gk, form='chunk', chunk_size=1, backend='numba')\n"
        "        assert np.allclose(o, naive.gla(q, k, v, gk)[0])\n"
        "        o, _ = fw.kda(q, k, v, gk, beta, form='chunk', chunk_size=1, backend='numba')\n"
        "        assert np.allclose(o, naive.kda(q, k, v, gk, beta)[0])\n"
        "        junk = [np.ones(n) for n in range(1, 200)]\n"
        "        del junk\n"
        "gc.collect()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "ok"


@pytest.mark.skipif(DISABLE_JIT, reason="a chunk of 1024 rows is minutes of Python loops")
def test_chunk_size_is_bounded() -> None:
    """Chunks are at most ``MAX_CHUNK`` rows: a larger ``chunk_size`` runs exactly as
    ``MAX_CHUNK`` and matches the naive loop."""
    call = random_call("gated_delta_rule", seed=6, batch=1, length=MAX_CHUNK + 3, heads=1,
                       key_dim=2, value_dim=3)  # fmt: skip
    at_max = _numba(call, "float64", MAX_CHUNK)
    above = _numba(call, "float64", 8 * MAX_CHUNK)
    np.testing.assert_array_equal(above[0], at_max[0])
    np.testing.assert_array_equal(above[1], at_max[1])
    _check(call, "float64", 8 * MAX_CHUNK)


@pytest.mark.skipif(DISABLE_JIT, reason="measures the compiled kernel's allocations")
@pytest.mark.slow
def test_scratch_memory_is_bounded() -> None:
    """``chunk_size=T=4096`` once took three ``C x C`` scratch matrices per thread (192 MiB
    each thread in float32); bounded by ``MAX_CHUNK`` it takes a few MiB."""
    code = (
        "import resource, numpy as np, fastweights as fw\n"
        "rng = np.random.default_rng(0)\n"
        "T, H, K = 4096, 2, 32\n"
        "q, k, v = rng.standard_normal((3, 1, T, H, K), dtype=np.float32)\n"
        "g = np.full((1, T, H), -0.01, np.float32); beta = np.full((1, T, H), 0.5, np.float32)\n"
        "fw.gated_delta_rule(q[:, :8], k[:, :8], v[:, :8], g[:, :8], beta[:, :8],\n"
        "                    form='chunk', chunk_size=8, backend='numba')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "fw.gated_delta_rule(q, k, v, g, beta, form='chunk', chunk_size=T, backend='numba')\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) // 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rise_mib = int(proc.stdout.strip())
    assert rise_mib < 128, f"peak RSS rose by {rise_mib} MiB"


# -- causal NaN and Inf ------------------------------------------------------------------------


def _poison(x: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    x = x.copy()
    x[index] = value
    return x


@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_non_finite_input_changes_no_earlier_output(op: str, data: st.DataObject) -> None:
    """NaN or Inf at token ``t`` of any input: every output before ``t`` is the clean call's,
    bit for bit, whatever the chunk size and where ``t`` falls in its chunk."""
    T = data.draw(st.sampled_from([2, 17, 40]), label="T")
    packed = data.draw(st.booleans(), label="packed")
    normalize = op == "linear_attn" and data.draw(st.booleans(), label="normalize")
    seed = data.draw(st.integers(0, 99), label="seed")
    if packed:
        seqlens = [T // 3, 0, 1, T - T // 3 - 1]
        call = random_call(op, seed=seed, seqlens=seqlens, key_dim=5, value_dim=3)
    else:
        call = random_call(op, seed=seed, length=T, key_dim=5, value_dim=3, normalize=normalize)
    names = [n for n in ("q", "k", "v", "g", "gk", "beta") if n in call.arrays]
    name = data.draw(st.sampled_from(names), label="input")
    # Gates must pass the sign check: they get NaN or -inf.
    values = [np.nan, -np.inf] if name in ("g", "gk") else [np.nan, np.inf, -np.inf]
    value = data.draw(st.sampled_from(values), label="value")
    x = call.arrays[name]
    rows = x.shape[1] // T
    t = data.draw(st.integers(0, T - 1), label="t")
    index = tuple(data.draw(st.integers(0, n - 1)) for n in x.shape)
    index = (index[0], t * rows + index[1] % rows, *index[2:])
    C = data.draw(st.sampled_from([1, 2, 3, 16, 64]), label="chunk_size")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")

    o_clean = _numba(call, dtype, C)[0]
    o = _numba(_with(call, **{name: _poison(x, index, value)}), dtype, C)[0]
    assert np.all(np.isfinite(o[:, :t])), "a non-finite value reached an earlier output"
    np.testing.assert_array_equal(o[:, :t], o_clean[:, :t])


# -- -inf gates reset exactly ------------------------------------------------------------------

# (poisoned token, reset token, chunk size): the reset in the poison's chunk, on the first
# row of a later chunk, in the middle of a later chunk, on the very next token.
RESETS = [(1, 5, 8), (3, 8, 8), (2, 13, 8), (7, 8, 8), (0, 1, 1), (4, 9, 3), (10, 11, 64)]


def _expect_reset(call: Call, poisoned: Call, dtype: str, C: int, u: int) -> None:
    """Outputs from token ``u`` and the final state: finite and those of ``call`` (the
    poisoned value replaced by a finite one), by the naive loop."""
    o, state = _numba(poisoned, dtype, C)
    want_o, want_state = call.expected()
    assert np.all(np.isfinite(o[:, u:])), "a non-finite value passed through the reset"
    assert np.all(np.isfinite(state)), "a non-finite value passed through the reset"
    assert_close(o[:, u:], want_o[:, u:], dtype=dtype, form="chunk", name="o after the reset")
    assert_close(state, want_state, dtype=dtype, form="chunk", name="state")


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["k", "v", "initial_state"])
@pytest.mark.parametrize(("t", "u", "C"), RESETS)
@pytest.mark.parametrize("op", ["simple_gla", "gated_delta_rule", "delta_product"])
def test_minus_inf_g_zeroes_a_non_finite_state(
    op: str, t: int, u: int, C: int, where: str, value: float
) -> None:
    """``g = -inf`` at token ``u`` sets the state to exactly 0, whatever a NaN or Inf at token
    ``t < u`` (or in the initial state) had put in it, inside a chunk and across chunks."""
    call = random_call(op, seed=u, batch=2, length=16, key_dim=5, value_dim=3)
    call = _with(call, g=_poison(call.arrays["g"], (1, u, 1), -np.inf))
    if where == "initial_state":
        index: tuple[int, ...] = (1, 1, 2, 0)
    else:
        rows = call.arrays[where].shape[1] // 16
        index = (1, t * rows + rows - 1, 1, 2)
    poisoned = _with(call, **{where: _poison(call.arrays[where], index, value)})
    clean = _with(call, **{where: _poison(call.arrays[where], index, 0.0)})
    for dtype in DTYPES:
        _expect_reset(clean, poisoned, dtype, C, u)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["k", "initial_state"])
@pytest.mark.parametrize(("t", "u", "C"), RESETS)
def test_minus_inf_gk_zeroes_a_non_finite_key_row(
    t: int, u: int, C: int, where: str, value: float
) -> None:
    """``gla``: a NaN or Inf in key channel ``x`` (of ``k`` at token ``t`` or of the initial
    state) fills row ``x`` of the state only; ``gk[u, x] = -inf`` sets that row to exactly 0."""
    call = random_call("gla", seed=u, batch=2, length=16, key_dim=5, value_dim=3)
    x = 2
    call = _with(call, gk=_poison(call.arrays["gk"], (1, u, 1, x), -np.inf))
    index = (1, 1, x, slice(None)) if where == "initial_state" else (1, t, 1, x)
    poisoned = _with(call, **{where: _poison(call.arrays[where], index, value)})
    clean = _with(call, **{where: _poison(call.arrays[where], index, 0.0)})
    for dtype in DTYPES:
        _expect_reset(clean, poisoned, dtype, C, u)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("C", [1, 2, 5, 64])
def test_kda_minus_inf_gk_on_the_first_token_zeroes_a_state_row(C: int, value: float) -> None:
    """``kda``: an initial state with a non-finite key row and ``gk = -inf`` on that channel at
    the first token of each packed sequence: the row is 0 before any delta step reads it."""
    call = random_call("kda", seed=C, seqlens=[3, 0, 1, 9], key_dim=5, value_dim=3)
    x = 3
    gk = call.arrays["gk"].copy()
    gk[0, [0, 3, 4], :, x] = -np.inf  # the first token of each non-empty sequence
    call = _with(call, gk=gk)
    s0 = call.arrays["initial_state"]
    index = (slice(None), slice(None), x, slice(None))
    poisoned = _with(call, initial_state=_poison(s0, index, value))
    clean = _with(call, initial_state=_poison(s0, index, 0.0))
    o, state = _numba(poisoned, "float64", C)
    # The empty sequence passes its initial state through, non-finite row and all.
    assert not np.all(np.isfinite(state[1]))
    state = np.delete(state, 1, axis=0)
    want_o, want_state = clean.expected()
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(state))
    assert_close(o, want_o, dtype="float64", form="chunk", name="o")
    assert_close(state, np.delete(want_state, 1, axis=0), dtype="float64", form="chunk")


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize(("t", "u", "C"), RESETS)
def test_kda_minus_inf_on_every_channel_zeroes_the_state(
    t: int, u: int, C: int, value: float
) -> None:
    """``kda`` with ``gk[u] = -inf`` on every key channel: a full reset, as ``g = -inf``."""
    call = random_call("kda", seed=u, batch=2, length=16, key_dim=5, value_dim=3)
    call = _with(call, gk=_poison(call.arrays["gk"], (1, u, 1, slice(None)), -np.inf))
    index = (1, t, 1, 1)
    poisoned = _with(call, v=_poison(call.arrays["v"], index, value))
    clean = _with(call, v=_poison(call.arrays["v"], index, 0.0))
    for dtype in DTYPES:
        _expect_reset(clean, poisoned, dtype, C, u)
