"""Any memory layout gives the result of plain inputs, on every backend (issue 11).

Each input, ``initial_state``, ``cu_seqlens``, ``state_indices`` and the decoding pool is
drawn in a random layout: C or Fortran order, a copy in a permuted memory order viewed back,
a strided slice of a bigger buffer, negative strides, big-endian, read-only (inputs only).
The call must equal the same call on C-contiguous native arrays, leave the caller's arrays
unchanged and update the pool in place, in its own dtype and layout. Backends: ``reference``,
``numba`` and ``cupy`` through its CPU emulator (skipped without ``g++``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from _support import implemented_as
from hypothesis import assume, given
from hypothesis import strategies as st

import fastweights
import fastweights.step
from fastweights.backends import RULES, list_backends
from fastweights.testing import Call, assert_close, random_call
from fastweights.testing._cases import OPS, token_arrays

BACKENDS = ("reference", "numba", "cupy")
NAMES = (*OPS, "linear_attn_normalized")
KINDS = ("C", "F", "permuted", "strided", "reversed", "broadcast")
_FIXED = ("cu_seqlens", "state_indices", "state")
"""Arrays whose values a broadcast layout would change (index arrays) or make read-only."""


def _skip_unless_available(name: str) -> None:
    if name == "cupy" and shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None:
        pytest.skip("g++ is not on PATH: the CUDA emulator cannot compile kernels")
    if not _available(name):
        pytest.skip(f"backend {name} is not available")


class _Emulated:
    """``FASTWEIGHTS_CUDA_EMULATE=1`` while a hypothesis example runs (fixtures are set up
    once per test, not per example, so the variable is set here)."""

    def __init__(self, backend: str) -> None:
        self.on = backend == "cupy"

    def __enter__(self) -> None:
        if self.on:
            self.old = os.environ.get("FASTWEIGHTS_CUDA_EMULATE")
            os.environ["FASTWEIGHTS_CUDA_EMULATE"] = "1"

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            if self.old is None:
                del os.environ["FASTWEIGHTS_CUDA_EMULATE"]
            else:
                os.environ["FASTWEIGHTS_CUDA_EMULATE"] = self.old


def _available(backend: str) -> bool:
    with _Emulated(backend):
        info = {b.name: b for b in list_backends()}.get(backend)
        return info is not None and info.available


@dataclass(frozen=True)
class Layout:
    kind: str
    order: tuple[int, ...] = ()
    """``permuted``: the memory order of the axes; ``strided``: the step of each axis;
    ``reversed``: the axes with negative strides."""
    big_endian: bool = False
    read_only: bool = False

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x``'s values in this layout (a new array; ``x`` is not modified)."""
        dtype = x.dtype.newbyteorder(">") if self.big_endian else x.dtype
        x = np.asarray(x, dtype=dtype)  # every branch below copies
        if self.kind == "C":
            out = np.array(x, order="C")
        elif self.kind == "F":
            out = np.array(x, order="F")
        elif self.kind == "permuted":
            inverse = np.argsort(self.order)
            out = np.array(x.transpose(self.order), order="C").transpose(inverse)
        elif self.kind == "strided":
            buf = np.full([n * s + 1 for n, s in zip(x.shape, self.order, strict=True)], 7.0)
            buf = buf.astype(dtype)
            out = buf[tuple(slice(1, None, s) for s in self.order)][
                tuple(slice(0, n) for n in x.shape)
            ]
            out[...] = x
        elif self.kind == "reversed":
            axes = tuple(self.order)
            out = np.flip(np.flip(x, axes).copy(), axes)
        else:  # zero strides: the first entry along the axes, repeated (read-only)
            first = tuple(slice(0, 1) if a in self.order else slice(None) for a in range(x.ndim))
            out = np.broadcast_to(np.array(x[first]), x.shape)
        if self.read_only:
            out.flags.writeable = False
        return out


@st.composite
def layouts(
    draw: Any, ndim: int, *, writeable: bool = False, fixed: bool = False, kind: str | None = None
) -> Layout:
    """A random layout of an ``ndim``-dimensional array, of the given ``kind`` or any; never
    read-only if ``writeable``, never broadcast (which changes values) if either flag is set."""
    kind = draw(st.sampled_from(KINDS)) if kind is None else kind
    if kind == "broadcast" and (writeable or fixed or ndim == 0):
        kind = "C"
    order: tuple[int, ...] = ()
    if kind == "permuted":
        order = tuple(draw(st.permutations(range(ndim))))
    elif kind == "strided":
        order = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    elif kind in ("reversed", "broadcast"):
        order = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1))))
    big = draw(st.booleans())
    read_only = False if writeable else draw(st.booleans())
    return Layout(kind, order, big, read_only)


def _op(name: str) -> tuple[str, dict[str, Any]]:
    return ("linear_attn", {"normalize": True}) if name == "linear_attn_normalized" else (name, {})


@st.composite
def calls(draw: Any, *, step: bool) -> Call:
    """A small random call (odd sizes, grouped heads, packed sequences, per-value beta)."""
    name = draw(st.sampled_from(NAMES))
    op, extra = _op(name)
    packed = not step and draw(st.booleans())
    seqlens = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)) if packed else None
    return random_call(
        op,
        seed=draw(st.integers(0, 2**16)),
        batch=1 if packed else draw(st.integers(1, 2)),
        length=1 if step else draw(st.integers(1, 5)),
        heads=draw(st.integers(1, 2)),
        groups=1 if RULES[op].same_heads else draw(st.integers(1, 2)),
        key_dim=draw(st.integers(1, 8)),
        value_dim=draw(st.integers(1, 6)),
        num_householder=draw(st.integers(1, 2)),
        seqlens=seqlens,
        beta_per_value=op != "delta_product" and draw(st.booleans()),
        use_qk_l2norm="use_qk_l2norm" in RULES[op].common and draw(st.booleans()),
        **extra,
    )


def _parts(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, tuple) else (x,)


def _like(parts: list[Any], template: Any) -> Any:
    return tuple(parts) if isinstance(template, tuple) else parts[0]


def _snapshot(arrays: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    return {n: [np.array(p, copy=True) for p in _parts(x)] for n, x in arrays.items()}


def _assert_unchanged(arrays: dict[str, Any], before: dict[str, list[np.ndarray]]) -> None:
    for n, x in arrays.items():
        for p, b in zip(_parts(x), before[n], strict=True):
            assert p.dtype == b.dtype, n
            np.testing.assert_array_equal(p, b, err_msg=f"{n} was modified")


def _plain(arrays: dict[str, Any]) -> dict[str, Any]:
    """C-contiguous native-byte-order copies, holding the same values."""

    def one(x: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=x.dtype.newbyteorder("="), order="C")

    return {n: _like([one(p) for p in _parts(x)], x) for n, x in arrays.items()}


def _relayout(data: Any, arrays: dict[str, Any]) -> Any:
    """Every array of ``arrays`` in a drawn layout (pairs part by part); half the time all
    of one kind (everything Fortran-ordered, say), as arrays from one source often are."""
    kind = data.draw(st.one_of(st.none(), st.sampled_from(KINDS)), label="common kind")
    out: dict[str, Any] = {}
    for n, x in arrays.items():
        if x is None:
            continue
        parts = [
            data.draw(
                layouts(np.ndim(p), writeable=n == "state", fixed=n in _FIXED, kind=kind),
                label=f"{n} layout",
            ).apply(np.asarray(p))
            for p in _parts(x)
        ]
        out[n] = _like(parts, x)
    return out


def _check_sequence(backend: str, data: Any) -> None:
    call = data.draw(calls(step=False), label="call")
    fn = getattr(fastweights, call.op)
    offered = {b.name: b for b in list_backends()}[backend].ops.get(implemented_as(call.op), ())
    assume(offered)  # an op the backend does not declare is not handed to it
    form = data.draw(st.sampled_from(call.forms(offered)), label="form")
    odd = _relayout(data, {n: x for n, x in call.arrays.items() if x is not None})
    plain = _plain(odd)
    before = _snapshot(odd)
    kw = dict(call.kwargs)
    want = Call(call.op, plain, kw).run(fn, backend=backend, form=form, output_final_state=True)
    got = Call(call.op, odd, kw).run(fn, backend=backend, form=form, output_final_state=True)
    _assert_unchanged(odd, before)
    assert_close(got[0], want[0], dtype="float64", form="recurrent", name="o")
    for g, w in zip(_parts(got[1]), _parts(want[1]), strict=True):
        assert g.dtype == w.dtype
        assert_close(g, w, dtype="float64", form="recurrent", name="final state")


def _check_step(backend: str, data: Any) -> None:
    call = data.draw(calls(step=True), label="call")
    assume(implemented_as(call.op) in {b.name: b for b in list_backends()}[backend].step_ops)
    fn = getattr(fastweights.step, call.op)
    inputs = {n: x for n, x in token_arrays(call, 0).items() if x is not None}
    inputs.pop("initial_state", None)
    N = int(next(iter(inputs.values())).shape[0])
    P = N + data.draw(st.integers(0, 2), label="spare pool rows")
    rows = np.array(data.draw(st.permutations(range(P)), label="rows")[:N], dtype=np.int64)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="pool seed"))
    s0 = call.arrays["initial_state"]
    pool = [rng.standard_normal((P, *p.shape[1:])) for p in _parts(s0)]
    for p, s in zip(pool, _parts(s0), strict=True):
        p[rows] = s
    pool_dtype = data.draw(st.sampled_from(["float64", "float32"]), label="pool dtype")
    plain_pool = [p.astype(pool_dtype) for p in pool]
    odd = _relayout(data, {**inputs, "state_indices": rows})
    inputs = _plain(odd)
    state = _relayout(data, {"state": _like(plain_pool, s0)})["state"]
    odd_pool = list(_parts(state))
    before = _snapshot(odd)
    kw = {k: v for k, v in call.kwargs.items() if k != "num_householder"}

    def run(arrays: dict[str, Any], state: list[np.ndarray]) -> Any:
        order = RULES[call.op].step_positional
        args = [arrays[n] for n in order]
        extra = {n: x for n, x in arrays.items() if n not in order}
        return fn(*args, _like(state, s0), **extra, **kw, backend=backend)

    o_want, _ = run(inputs, plain_pool)
    o_got, out = run(odd, odd_pool)
    _assert_unchanged(odd, before)
    for got, want, o in zip(_parts(out), plain_pool, odd_pool, strict=True):
        assert got is o, "the pool is updated in place"
        assert got.dtype == o.dtype
        tol = "float32" if pool_dtype == "float32" else "float64"
        assert_close(got, want, dtype=tol, form="recurrent", name="pool")
    tol = "float32" if pool_dtype == "float32" else "float64"
    assert_close(o_got, o_want, dtype=tol, form="recurrent", name="o")


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_sequence_op_any_layout(backend, data):
    _skip_unless_available(backend)
    with _Emulated(backend):
        _check_sequence(backend, data)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_step_any_layout(backend, data):
    _skip_unless_available(backend)
    with _Emulated(backend):
        _check_step(backend, data)
