"""Issue 11 (validation part): read-only pools, aliasing, compute dtypes and argument errors.

Every test runs on each backend that takes NumPy arrays: ``reference``, ``numba`` and ``cupy``
through its CPU emulator (``FASTWEIGHTS_CUDA_EMULATE=1``, skipped without ``g++``). Results
are compared with the same call on plain inputs or with the float64 naive loops.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import pytest
from _support import implemented_as

import fastweights
import fastweights.step
from fastweights.backends import RULES, get_backend, list_backends
from fastweights.testing import Call, assert_close, random_call
from fastweights.testing._cases import ARG_ORDER, OPS, token_arrays

BACKENDS = ("reference", "numba", "cupy")
STEP_OPS = (*OPS, "linear_attn_normalized")
PRIMER = ("mesa_net", "recurrent_delta_rule", "srwm")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A backend name; ``cupy`` runs its kernels in the CPU emulator on NumPy arrays."""
    name = str(request.param)
    if name == "cupy":
        if shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None:
            pytest.skip("g++ is not on PATH: the CUDA emulator cannot compile kernels")
        monkeypatch.setenv("FASTWEIGHTS_CUDA_EMULATE", "1")
    info = {b.name: b for b in list_backends()}.get(name)
    if info is None or not info.available:
        pytest.skip(f"backend {name} is not available")
    return name


def _op(name: str) -> tuple[str, dict[str, Any]]:
    """``(op, keywords)`` of a test op name (``linear_attn_normalized``)."""
    if name == "linear_attn_normalized":
        return "linear_attn", {"normalize": True}
    return name, {}


def _call(name: str, *, seed: int = 0, length: int = 3, **kw: Any) -> Call:
    op, extra = _op(name)
    kw.setdefault("num_householder", 2)
    groups = 1 if RULES[op].same_heads else 2
    return random_call(
        op, seed=seed, batch=2, length=length, heads=1, groups=groups, key_dim=4, value_dim=4,
        **extra, **kw,
    )  # fmt: skip


def _step_args(call: Call, t: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of ``fastweights.step.<op>`` for token ``t``."""
    return Call(call.op, token_arrays(call, t), {}).arguments(step=True)


def _pools(call: Call, dtype: Any = np.float64) -> Any:
    """A copy of the call's initial state as a pool (a pair for normalised linear attention)."""
    s0 = call.arrays["initial_state"]
    if isinstance(s0, tuple):
        return tuple(np.array(s, dtype=dtype) for s in s0)
    return np.array(s0, dtype=dtype)


def _step(call: Call, args: tuple[Any, ...], kw: dict[str, Any], state: Any, backend: str) -> Any:
    fn = getattr(fastweights.step, call.op)
    extra = {k: v for k, v in call.kwargs.items() if k != "num_householder"}
    return fn(*args, state, **kw, **extra, backend=backend)


def _parts(state: Any) -> tuple[np.ndarray, ...]:
    return tuple(state) if isinstance(state, tuple) else (state,)


# --- read-only pools (item 2) -----------------------------------------------------------


def _read_only(kind: str, pool: np.ndarray, tmp_path: Any) -> tuple[np.ndarray, Any]:
    """``pool`` made read-only in one of three ways; returns it and the memory behind it."""
    if kind == "flag":
        out = pool.copy()
        out.flags.writeable = False
        return out, out
    if kind == "frombuffer":
        raw = pool.tobytes()
        return np.frombuffer(raw, dtype=pool.dtype).reshape(pool.shape), raw
    path = tmp_path / "pool.bin"
    pool.tofile(path)
    out = np.memmap(path, dtype=pool.dtype, mode="r", shape=pool.shape)
    return out, path


@pytest.mark.parametrize("kind", ["flag", "frombuffer", "memmap"])
@pytest.mark.parametrize("name", STEP_OPS)
def test_read_only_pool_is_refused_before_any_write(name, kind, backend, tmp_path):
    call = _call(name)
    args, kw = _step_args(call)
    pools = _pools(call)
    for half in range(len(_parts(pools))):  # each half of an (S, z) pair on its own
        parts = [p.copy() for p in _parts(pools)]
        before = [p.copy() for p in parts]
        parts[half], memory = _read_only(kind, parts[half], tmp_path)
        state = tuple(parts) if isinstance(pools, tuple) else parts[0]
        with pytest.raises(ValueError, match=r"\bstate\b.*read-only"):
            _step(call, args, kw, state, backend)
        for p, b in zip(parts, before, strict=True):
            np.testing.assert_array_equal(p, b)  # neither half was written
        if kind == "frombuffer":
            assert memory == before[half].tobytes()


# --- aliasing (item 3) --------------------------------------------------------------------


# Not the primer's rules: their numba and reference steps read every input of the token before
# writing the pool, so such a test of them passes even without validation's copy (checked by
# disabling _unaliased): it could not fail.
@pytest.mark.parametrize("name", [n for n in STEP_OPS if n not in PRIMER])
def test_step_inputs_that_view_the_pool_are_read_first(name, backend):
    """Every input a view of rows the step updates: the result of reading them first."""
    if implemented_as(_op(name)[0]) not in get_backend(backend).step_ops:
        pytest.skip(f"{backend} does not decode {name}")
    N, H, HV, K = 1, 1, 4, 64
    rng = np.random.default_rng(1)
    op, extra = _op(name)
    shape = (N, HV, K, K)
    pool = rng.standard_normal(shape) * 0.3
    if extra:
        pool = (pool, rng.random((N, HV, K)))
    S = _parts(pool)[0]
    S[:, :, 4, :] = -0.05 * rng.random((N, HV, K))  # rows that serve as log-decays
    S[:, :, 5, :] = rng.random((N, HV, K))  # and as write strengths
    views: dict[str, Any] = {
        "q": S[:, :H, 0, :],
        "k": S[:, :H, 1, :],
        "v": S[:, :, 2, :],
        "g": S[:, :, 4, 0],
        "gk": S[:, :, 4, :],
        "beta": S[:, :, 5, 0],
        "w": S[:, :, 4, :],
        "a": S[:, :, 6, :],
        "b": S[:, :, 7, :],
        "kk": S[:, :, 7, :],
    }
    if op == "delta_product":
        views.update(k=S[:, None, :H, 1, :], v=S[:, None, :, 2, :], beta=S[:, None, :, 5, 0])
    needed = {"q", "k", "v", *ARG_ORDER[op][3:]} | ({"g"} if op == "delta_product" else set())
    fn = getattr(fastweights.step, op)

    def call(arrays: dict[str, Any], state: Any) -> Any:
        args = tuple(arrays[n] for n in ARG_ORDER[op])
        kw = {"g": arrays["g"]} if op == "delta_product" else {}
        return fn(*args, state, **kw, **extra, backend=backend)

    copied = {n: views[n].copy() for n in needed}
    plain = tuple(p.copy() for p in _parts(pool))
    o_want, _ = call(copied, plain if extra else plain[0])
    o_got, _ = call({n: views[n] for n in needed}, pool)
    assert_close(o_got, o_want, dtype="float64", form="recurrent", name="o")
    for got, want in zip(_parts(pool), plain, strict=True):
        assert_close(got, want, dtype="float64", form="recurrent", name="pool")


def test_state_pair_sharing_memory_is_refused(backend):
    call = _call("linear_attn_normalized")
    args, kw = _step_args(call)
    S, _ = _pools(call)
    z = S[..., 0]  # z a view of S's first value column
    before = S.copy()
    with pytest.raises(ValueError, match=r"state\[0\] and state\[1\]"):
        _step(call, args, kw, (S, z), backend)
    np.testing.assert_array_equal(S, before)


def test_interleaved_disjoint_state_pair_is_accepted(backend):
    """``S`` and ``z`` in one buffer without overlapping: a legal layout."""
    call = _call("linear_attn_normalized")
    args, kw = _step_args(call)
    S, z = _pools(call)
    buf = np.concatenate([S, z[..., None]], axis=-1)
    pair = (buf[..., :-1], buf[..., -1])
    o_want, (S_want, z_want) = _step(call, args, kw, (S.copy(), z.copy()), backend)
    o_got, _ = _step(call, args, kw, pair, backend)
    assert_close(o_got, o_want, dtype="float64", form="recurrent")
    assert_close(buf[..., :-1], S_want, dtype="float64", form="recurrent")
    assert_close(buf[..., -1], z_want, dtype="float64", form="recurrent")


# --- compute dtype by size and kind (item 3) ----------------------------------------------

# (input dtype, compute dtype)
DTYPES = [
    (">f8", np.float64),
    (">f4", np.float32),
    (">f2", np.float32),
    (np.longdouble, np.float64),
]


def _declined(backend: str, dtype: Any) -> bool:
    """The cupy kernels have no long double: that backend declines it (TypeError)."""
    return backend == "cupy" and np.dtype(dtype).itemsize > 8


@pytest.mark.parametrize(("dtype", "compute"), DTYPES, ids=[str(d[0]) for d in DTYPES])
@pytest.mark.parametrize("op", ["retention", "gated_delta_rule", "linear_attn_normalized"])
def test_compute_dtype_follows_size_and_kind(op, dtype, compute, backend):
    call = _call(op, seed=2, length=5)
    odd = call.cast(np.dtype(dtype))
    fn = getattr(fastweights, odd.op)
    if _declined(backend, dtype):
        with pytest.raises(TypeError, match="cupy"):
            odd.run(fn, backend=backend, output_final_state=True)
        return
    o, S = odd.run(fn, backend=backend, output_final_state=True)
    want_o, want_S = odd.cast(np.float64).expected()  # float64 loop on the same values
    for s in _parts(S):
        assert s.dtype == np.dtype(compute)
    assert o.dtype == np.dtype(dtype)
    tol = "float16" if np.dtype(dtype).itemsize == 2 else np.dtype(compute).name
    assert_close(o.astype(np.float64), want_o, dtype=tol, form="recurrent", name="o")
    for s, w in zip(_parts(S), _parts(want_S), strict=True):
        assert_close(s, w, dtype=tol, form="recurrent", name="state")


@pytest.mark.parametrize("pool_dtype", [">f8", ">f4"])
@pytest.mark.parametrize("op", ["gated_delta_rule", "linear_attn_normalized"])
def test_big_endian_pool_is_updated_in_its_dtype(op, pool_dtype, backend):
    call = _call(op, seed=3)
    args, kw = _step_args(call)
    native = np.dtype(pool_dtype).newbyteorder("=")
    args = tuple(a.astype(native) for a in args)
    kw = {n: a.astype(native) for n, a in kw.items()}
    pool = tuple(p.astype(pool_dtype) for p in _parts(_pools(call)))
    plain = tuple(p.astype(native) for p in pool)
    o_want, _ = _step(call, args, kw, plain if len(plain) == 2 else plain[0], backend)
    o_got, out = _step(call, args, kw, pool if len(pool) == 2 else pool[0], backend)
    for got, want in zip(_parts(out), plain, strict=True):
        assert got.dtype == np.dtype(pool_dtype)
        assert_close(got, want, dtype=native.name, form="recurrent", name="pool")
    assert_close(o_got, o_want, dtype=native.name, form="recurrent", name="o")


# --- errors: class and argument name, before any work (item 5) -----------------------------


@pytest.fixture
def spy(plugins):
    """A plugin backend named ``spy`` that counts its calls: errors must come before."""
    from _support import FakeBackend

    fake = FakeBackend("spy")
    plugins(spy=fake)
    return fake


def _masked(x: np.ndarray) -> Any:
    return np.ma.masked_array(x, mask=np.zeros(x.shape, bool))


def _sequence_bad_arguments(name: str) -> list[tuple[str, dict[str, Any], Any, str]]:
    """``(id, arrays to replace, keywords, expected exception, argument)`` of a sequence op."""
    op, _ = _op(name)
    cases: list[Any] = []
    optional = {a.name for a in RULES[op].args if a.optional}
    keyword = tuple(a.name for a in RULES[op].args if a.keyword_only)
    for arg in ARG_ORDER[op] + keyword:
        for label, bad in (("None", None), ("0.0", 0.0), ("str", "zeros")):
            if arg in optional and bad is None:
                continue  # None leaves that part out
            cases.append((f"{arg}={label}", {arg: bad}, {}, TypeError, arg))
        cases.append((f"{arg} masked", {arg: "masked"}, {}, TypeError, arg))
    for label, bad in (("0.0", 0.0), ("str", "zeros"), ("masked", "masked")):
        cases.append(
            (f"initial_state={label}", {"initial_state": bad}, {}, TypeError, "initial_state")
        )
    flags = ["output_final_state"] + (
        ["use_qk_l2norm"] if "use_qk_l2norm" in RULES[op].common else []
    )
    flags += ["normalize"] if op == "linear_attn" else []
    for flag in flags:
        for label, bad in (("array", np.array([1, 0])), ("str", "no"), ("int", 1)):
            cases.append((f"{flag}={label}", {}, {flag: bad}, TypeError, flag))
    cases.append(("cu_seqlens masked", {"cu_seqlens": "masked"}, {}, ValueError, "cu_seqlens"))
    return cases


SEQUENCE_CASES = [
    pytest.param(name, *case[1:], id=f"{name}-{case[0]}")
    for name in STEP_OPS
    for case in _sequence_bad_arguments(name)
]


@pytest.mark.parametrize(("name", "arrays", "keywords", "error", "arg"), SEQUENCE_CASES)
def test_sequence_argument_errors(name, arrays, keywords, error, arg, spy):
    call = _call(name, length=4)
    new = dict(call.arrays)
    if "cu_seqlens" in arrays:
        call = _call(name, length=4, seqlens=[1, 3])
        new = dict(call.arrays)
    for n, bad in arrays.items():
        if isinstance(bad, str) and bad == "masked":
            x = new[n]
            bad = tuple(_masked(a) for a in x) if isinstance(x, tuple) else _masked(np.asarray(x))
        new[n] = bad
    before = {n: np.array(x, copy=True) for n, x in new.items() if isinstance(x, np.ndarray)}
    bad_call = Call(call.op, new, call.kwargs)
    fn = getattr(fastweights, call.op)
    args = tuple(new.get(n) for n in ARG_ORDER[call.op])
    kw = {n: x for n, x in new.items() if n not in ARG_ORDER[call.op]}
    with pytest.raises(error, match=rf"\b{arg}\b"):
        fn(*args, **kw, **bad_call.kwargs, **keywords, backend="spy")
    assert spy.calls == []
    for n, b in before.items():
        np.testing.assert_array_equal(new[n], b)


@pytest.mark.parametrize(
    "name", [op for op in OPS if "scale" in RULES[op].common and RULES[op].default_scale is None]
)
def test_zero_key_dim_with_default_scale_names_scale(name, spy):
    call = _call(name)
    per_key = {a.name for a in RULES[call.op].arrays if a.shape.endswith("K]")}
    new = {n: (x[..., :0] if n in per_key else x) for n, x in call.arrays.items()}
    new.pop("initial_state")
    with pytest.raises(ValueError, match=r"\bscale\b"):
        Call(call.op, new, call.kwargs).run(getattr(fastweights, call.op), backend="spy")
    assert spy.calls == []


def test_zero_key_dim_with_explicit_scale_runs(backend):
    """K = 0 is legal with a scale: the state is empty and the output zero."""
    call = _call("gated_delta_rule")
    new = {n: (x[..., :0] if n in ("q", "k") else x) for n, x in call.arrays.items()}
    new.pop("initial_state")
    if backend == "cupy":  # its register tiles need K >= 1: it declines
        pytest.skip("the cupy kernels take K = 1..256")
    o, S = Call(call.op, new, call.kwargs).run(
        fastweights.gated_delta_rule, backend=backend, scale=1.0, output_final_state=True
    )
    assert S.shape[2] == 0 and not np.any(o)


def test_num_householder_out_of_range_names_it(backend):
    """10**12 delta steps per token (T = 0, so every shape matches): a ValueError, not an
    OverflowError from the CUDA launch."""
    q = np.zeros((1, 0, 1, 4))
    beta = np.zeros((1, 0, 1))
    with pytest.raises(ValueError, match=r"\bnum_householder\b"):
        fastweights.delta_product(q, q, q, beta, num_householder=10**12, backend=backend)


def test_cupy_declines_more_value_heads_than_the_grid_holds(monkeypatch):
    if shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None:
        pytest.skip("g++ is not on PATH")
    monkeypatch.setenv("FASTWEIGHTS_CUDA_EMULATE", "1")
    x = np.zeros((1, 1, 65536, 1), dtype=np.float32)
    with pytest.raises(TypeError, match=r"\bHV\b"):
        fastweights.linear_attn(x, x, x, backend="cupy", scale=1.0)


def _step_bad_arguments(name: str) -> list[Any]:
    op, _ = _op(name)
    cases: list[Any] = []
    optional = {a.name for a in RULES[op].args if a.optional}
    for arg in RULES[op].step_positional:
        for label, bad in (("None", None), ("0.0", 0.0), ("str", "zeros"), ("masked", "masked")):
            if arg in optional and bad is None:
                continue  # None leaves that part out
            cases.append((f"{arg}={label}", {arg: bad}, {}, TypeError, arg))
    for label, bad in (("0.0", 0.0), ("str", "zeros"), ("masked", "masked")):
        cases.append((f"state={label}", {"state": bad}, {}, TypeError, "state"))
    flags = ["use_qk_l2norm"] if "use_qk_l2norm" in RULES[op].common else []
    flags += ["normalize"] if op == "linear_attn" else []
    for flag in flags:
        cases.append((f"{flag}=array", {}, {flag: np.array([1, 0])}, TypeError, flag))
    for label, bad in (("float", np.array([0.0, 1.0])), ("masked", "masked")):
        cases.append(
            (f"state_indices {label}", {}, {"state_indices": bad}, ValueError, "state_indices")
        )
    return cases


STEP_CASES = [
    pytest.param(name, *case[1:], id=f"{name}-{case[0]}")
    for name in STEP_OPS
    for case in _step_bad_arguments(name)
]


@pytest.mark.parametrize(("name", "arrays", "keywords", "error", "arg"), STEP_CASES)
def test_step_argument_errors(name, arrays, keywords, error, arg, spy):
    call = _call(name)
    args, kw = _step_args(call)
    named = dict(zip(RULES[call.op].step_positional, args, strict=True))
    state = _pools(call)
    keywords = dict(keywords)
    if isinstance(keywords.get("state_indices"), str):
        keywords["state_indices"] = _masked(np.arange(2))
    for n, bad in arrays.items():
        if isinstance(bad, str) and bad == "masked":
            x = state if n == "state" else named[n]
            bad = tuple(_masked(a) for a in x) if isinstance(x, tuple) else _masked(x)
        if n == "state":
            state = bad
        else:
            named[n] = bad
    before = [p.copy() for p in _parts(_pools(call))]
    fn = getattr(fastweights.step, call.op)
    with pytest.raises(error, match=rf"\b{arg}\b"):
        extra = {k: v for k, v in call.kwargs.items() if k != "num_householder"}
        fn(*named.values(), state, **kw, **extra, **keywords, backend="spy")
    assert spy.calls == []
    if isinstance(state, np.ndarray | tuple) and not isinstance(state, np.ma.MaskedArray):
        for p, b in zip(_parts(state), before, strict=True):
            np.testing.assert_array_equal(p, b)
