"""Non-finite inputs propagate causally, and ``-inf`` gates reset exactly (API.md).

The rule: a NaN or Inf in an input at token ``t`` changes no output before ``t``, in every form
of every backend; a ``-inf`` in ``g`` sets the state to exactly zero, a ``-inf`` in ``gk`` that
key channel's row, even when it held a NaN. Every engine is checked against itself (outputs
before ``t`` equal the clean call's) and against the float64 naive loop (outputs after a reset
equal those of a call whose poisoned values were replaced by finite ones).

Engines: the reference backend with NumPy and array-api-strict arrays in every form, numba's
recurrent and chunk forms, the CUDA kernels through the CPU emulator (``cuda_emulated``), and
decoding steps on each of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest
from _support import implemented_as
from hypothesis import given, settings
from hypothesis import strategies as st

import fastweights
from fastweights.backends import RULES, dims_of, list_backends
from fastweights.testing import (
    OPS,
    Call,
    assert_close,
    naive,
    random_call,
    run_steps,
    to_numpy,
)

# Inf arithmetic (0 * inf, inf - inf) makes NumPy warn; the values are what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

GATE = {
    "simple_gla": "g",
    "gated_delta_rule": "g",
    "delta_product": "g",
    "gla": "gk",
    "kda": "gk",
    "mesa_net": "g",
}
GATED = tuple(GATE)

# Many engines x ops: a dozen placements each, whatever the profile asks (CI's asks 40).
_FEW = settings(max_examples=min(settings.default.max_examples, 12))


class Engine(NamedTuple):
    backend: str
    form: str  # a form of the sequence op, or "step" for fastweights.step
    xp: str = "numpy"

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        if self.form != "chunk":
            return (64,)
        # numba's chunk form at chunk_size 1 and 2 is issue 11's item 1, tested elsewhere.
        return (1, 2, 5, 16, 64) if self.backend == "reference" else (5, 16, 64)


def _available() -> dict[str, Any]:
    return {b.name: b for b in list_backends() if b.available}


def _engines() -> Iterator[Any]:
    backends = _available()
    forms = {"reference": ("recurrent", "chunk", "parallel"), "numba": ("recurrent", "chunk")}
    for name, backend_forms in forms.items():
        if name not in backends:
            continue
        for form in (*backend_forms, "step"):
            yield pytest.param(Engine(name, form), id=f"{name}-{form}")
    try:
        import array_api_strict  # noqa: F401
    except ImportError:
        pass
    else:
        for form in ("recurrent", "chunk", "parallel"):
            engine = Engine("reference", form, "array_api_strict")
            # Slow (array_api_strict's checks); the quick subset has tests/test_namespaces.py.
            yield pytest.param(engine, id=f"reference-{form}-strict", marks=pytest.mark.slow)
    no_cxx = shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None
    for form in ("recurrent", "step"):
        yield pytest.param(
            Engine("cupy", form),
            id=f"cupy-emulated-{form}",
            marks=[
                pytest.mark.cuda_emulated,
                pytest.mark.skipif(no_cxx, reason="g++ is not on PATH"),
                *([pytest.mark.slow] if form == "step" else []),
            ],
        )


ENGINES = list(_engines())


@contextlib.contextmanager
def _engine_env(engine: Engine) -> Iterator[None]:
    """The cupy engine runs NumPy arrays through the CPU emulator of its kernels."""
    with pytest.MonkeyPatch.context() as mp:
        if engine.backend == "cupy":
            mp.setenv("FASTWEIGHTS_CUDA_EMULATE", "1")
        yield


def _offers(engine: Engine, call: Call) -> bool:
    op = implemented_as(call.op)
    with _engine_env(engine):
        backend = _available().get(engine.backend)
    if engine.form == "step":
        return backend is not None and op in backend.step_ops
    offered = () if backend is None else backend.ops.get(op, ())
    return engine.form in offered and call.unavailable_form(engine.form) is None


def _run(engine: Engine, call: Call, chunk_size: int) -> tuple[np.ndarray, Any]:
    """``(o, final state)`` as NumPy arrays (the final pool for a step engine)."""
    if engine.form == "step":
        s0 = call.arrays["initial_state"]
        pool = tuple(np.array(p) for p in s0) if isinstance(s0, tuple) else np.array(s0)
        got = run_steps(call, pool, backend=engine.backend)
        return got.o, got.state
    xp = None
    if engine.xp == "array_api_strict":
        import array_api_strict as xp
    chunk = {"chunk_size": chunk_size} if "chunk_size" in RULES[call.op].common else {}
    o, state = call.run(
        getattr(fastweights, call.op),
        xp,
        backend=engine.backend,
        form=engine.form,
        output_final_state=True,
        **chunk,
    )
    if isinstance(state, tuple):
        return to_numpy(o), tuple(to_numpy(s) for s in state)
    return to_numpy(o), to_numpy(state)


def _rows(call: Call, name: str) -> int:
    """Rows per token of array ``name`` (``n`` for DeltaProduct's ``k, v, beta``)."""
    if call.op == "delta_product" and name in ("k", "v", "beta"):
        return int(call.kwargs["num_householder"])
    return 1


def _with(call: Call, **arrays: Any) -> Call:
    return dataclasses.replace(call, arrays={**call.arrays, **arrays})


def _leaves(state: Any) -> tuple[np.ndarray, ...]:
    return state if isinstance(state, tuple) else (state,)


def _token_inputs(call: Call) -> list[str]:
    """The inputs with a token axis (not ``lamb``, the recurrent weights ``R_q``, ``W0``)."""
    return [
        a.name
        for a in RULES[call.op].arrays
        if a.name in call.arrays and {"T", "R"} & set(dims_of(a.shape))
    ]


def _skip_unless_offered(engine: Engine, call: Call) -> None:
    if not _offers(engine, call):
        pytest.skip(f"{engine.backend} has no {engine.form} form for this call")


# -- causality -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("engine", ENGINES)
@_FEW
@given(data=st.data())
def test_non_finite_input_changes_no_earlier_output(
    engine: Engine, op: str, data: st.DataObject
) -> None:
    """NaN or +-Inf at token ``t`` of one input: outputs before ``t`` are the clean call's."""
    length = data.draw(st.sampled_from([1, 2, 17, 37]), label="T")
    normalize = op == "linear_attn" and data.draw(st.booleans(), label="normalize")
    call = random_call(op, seed=data.draw(st.integers(0, 99)), length=length, normalize=normalize)
    _skip_unless_offered(engine, call)
    name = data.draw(st.sampled_from(_token_inputs(call)), label="input")
    # A positive gate is rejected by the sign check: gates get -inf or NaN.
    values = [np.nan, -np.inf] if name in RULES[op].log_decays else [np.nan, np.inf, -np.inf]
    value = data.draw(st.sampled_from(values), label="value")
    t = data.draw(st.integers(0, length - 1), label="t")
    x = call.arrays[name].copy()
    rows = _rows(call, name)
    b = data.draw(st.integers(0, x.shape[0] - 1), label="b")
    row = t * rows + data.draw(st.integers(0, rows - 1), label="step")
    head = data.draw(st.integers(0, x.shape[2] - 1), label="head")
    if x.ndim == 4:
        x[b, row, head, data.draw(st.integers(0, x.shape[3] - 1), label="channel")] = value
    else:
        x[b, row, head] = value
    chunk_size = data.draw(st.sampled_from(engine.chunk_sizes), label="chunk_size")

    with _engine_env(engine):
        o_clean, _ = _run(engine, call, chunk_size)
        o, _ = _run(engine, _with(call, **{name: x}), chunk_size)
    assert np.all(np.isfinite(o[:, :t])), "a non-finite value reached an earlier output"
    np.testing.assert_allclose(o[:, :t], o_clean[:, :t], rtol=1e-12, atol=0)
    others = [i for i in range(o.shape[0]) if i != b]
    np.testing.assert_allclose(o[others], o_clean[others], rtol=1e-12, atol=0)


# -- -inf gates reset exactly ----------------------------------------------------------------


def _reset_case(op: str, data: st.DataObject) -> tuple[Call, Call, int]:
    """``(poisoned call, the same with finite values, reset token t)``.

    The poison is a NaN in ``initial_state``, or a NaN or Inf in an input before ``t``; a
    ``-inf`` gate at ``t`` resets it away. A per-head gate resets the whole state. A per-channel
    gate resets the poisoned key rows only where that suffices: ``gla`` keeps its rows apart,
    and ``kda`` mixes them at every delta step, so there only a reset at ``t = 0`` of the rows
    of a NaN initial state, or a reset of every channel, removes the poison.
    """
    length = data.draw(st.sampled_from([2, 17, 37]), label="T")
    call = random_call(op, seed=data.draw(st.integers(0, 99)), length=length)
    gate_name = GATE[op]
    gate = call.arrays[gate_name].copy()
    per_channel = gate_name == "gk"
    source = data.draw(st.sampled_from(["initial_state", "input"]), label="source")
    t = data.draw(st.integers(0 if source == "initial_state" else 1, length - 1), label="t")
    clean_arrays: dict[str, Any] = {}
    dirty_arrays: dict[str, Any] = {}
    if source == "initial_state":
        s0 = call.arrays["initial_state"]
        K = _leaves(s0)[0].shape[2]
        channels = data.draw(
            st.lists(st.integers(0, K - 1), min_size=1, max_size=K, unique=True), label="rows"
        )
        if op == "kda":
            t = 0
        dirty = tuple(p.copy() for p in _leaves(s0))  # every part of a pair (mesa's H, G)
        zeroed = tuple(p.copy() for p in _leaves(s0))
        layout = RULES[op].state_layout()
        for d, z, part in zip(dirty, zeroed, layout, strict=True):
            d[:, :, channels, ...] = np.nan
            z[:, :, channels, ...] = 0.0
            if part.sample == "gram":  # mesa's H: zero the columns too, so it stays PSD
                d[..., channels] = np.nan
                z[..., channels] = 0.0
        pair = isinstance(s0, tuple)
        clean_arrays["initial_state"] = zeroed if pair else zeroed[0]
        dirty_arrays["initial_state"] = dirty if pair else dirty[0]
        if per_channel:
            gate[:, t, :, channels] = -np.inf
        else:
            gate[:, t] = -np.inf
    else:
        names = [n for n in ("k", "v", "beta", gate_name) if n in call.arrays]
        name = data.draw(st.sampled_from(names), label="input")
        values = [np.nan] if name == gate_name else [np.nan, np.inf, -np.inf]
        value = data.draw(st.sampled_from(values), label="value")
        t1 = data.draw(st.integers(0, t - 1), label="t1")
        row = t1 * _rows(call, name)
        x = (gate if name == gate_name else call.arrays[name]).copy()
        channel = data.draw(st.integers(0, x.shape[-1] - 1), label="channel")
        index = (slice(None), row, slice(None), channel)[: x.ndim]
        x[index] = value
        if name == gate_name and op == "gla":
            gate[:, t, :, channel] = -np.inf  # gla: the NaN gate poisons that row only
            x[:, t, :, channel] = -np.inf
        elif per_channel:
            gate[:, t] = -np.inf
            if name == gate_name:
                x[:, t] = -np.inf
        else:
            gate[:, t] = -np.inf
            if name == gate_name:
                x[:, t] = -np.inf
        if name == gate_name:
            dirty_arrays[gate_name] = x
        else:
            dirty_arrays[name] = x
    clean_arrays.setdefault(gate_name, gate)
    dirty_arrays.setdefault(gate_name, gate)
    clean = _with(call, **clean_arrays)
    dirty = _with(call, **{**clean_arrays, **dirty_arrays})
    return dirty, clean, t


def _assert_after_reset(
    got: tuple[np.ndarray, Any], want: tuple[np.ndarray, Any], t: int, form: str
) -> None:
    o, state = got
    assert np.all(np.isfinite(o[:, t:])), "a NaN or Inf survived the reset"
    assert_close(o[:, t:], want[0][:, t:], dtype="float64", form=form, name="o after the reset")
    for part, ref in zip(_leaves(state), _leaves(want[1]), strict=True):
        assert np.all(np.isfinite(part)), "a NaN or Inf survived the reset in the final state"
        assert_close(part, ref, dtype="float64", form=form, name="final state")


@pytest.mark.parametrize("op", GATED)
@pytest.mark.parametrize("engine", ENGINES)
@_FEW
@given(data=st.data())
def test_minus_inf_gate_clears_non_finite_state(
    engine: Engine, op: str, data: st.DataObject
) -> None:
    """A NaN state (initial or from an earlier input), then ``-inf``: as if it was never NaN."""
    dirty, clean, t = _reset_case(op, data)
    _skip_unless_offered(engine, dirty)
    chunk_size = data.draw(st.sampled_from(engine.chunk_sizes), label="chunk_size")
    want = clean.expected()
    form = "recurrent" if engine.form == "step" else engine.form
    with _engine_env(engine):
        got = _run(engine, dirty, chunk_size)
    _assert_after_reset(got, want, t, form)


@pytest.mark.parametrize("op", GATED)
@given(data=st.data())
def test_naive_oracle_resets_exactly(op: str, data: st.DataObject) -> None:
    """The naive loops that plugins are checked against follow the same rule."""
    dirty, clean, t = _reset_case(op, data)
    _assert_after_reset(dirty.expected(), clean.expected(), t, "recurrent")


def test_reset_in_gk_clears_only_its_row() -> None:
    """``gla``: a NaN in key row 3 of the state stays in row 3 until ``gk = -inf`` there."""
    call = random_call("gla", seed=5, length=9, batch=1)
    s0 = call.arrays["initial_state"].copy()
    s0[:, :, 3, :] = np.nan
    gk = call.arrays["gk"].copy()
    gk[:, 4, :, 3] = -np.inf
    o, _ = naive.gla(*[call.arrays[n] for n in ("q", "k", "v")], gk, initial_state=s0)
    assert np.all(np.isnan(o[:, :4])) and np.all(np.isfinite(o[:, 4:]))
    for form in ("recurrent", "chunk"):
        o, state = _run(Engine("reference", form), _with(call, initial_state=s0, gk=gk), 4)
        assert np.all(np.isnan(o[:, :4])) and np.all(np.isfinite(o[:, 4:])), form
        assert np.all(np.isfinite(state)), form
