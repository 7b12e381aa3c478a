"""The conformance checks: every backend must compute the same functions as the oracle."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from .._ops import RULES
from ..rules._rule import dims_of
from ._cases import OPS, Call, GoldenCase, load_golden_cases, random_call, run_steps, token_arrays
from ._tolerance import assert_close, relative_rms, to_namespace, to_numpy, tolerance

Check = Callable[[], None]

_MUTABLE_NAMESPACES = ("numpy", "cupy", "torch")


class _Failures:
    """Collects the failures of one check so that one run reports all of them."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.items: list[str] = []

    @contextmanager
    def case(self, label: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # every failure is recorded, none stops the others
            text = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
            self.items.append(f"{label}: {text}".replace("\n", "\n    "))

    def raise_if_any(self) -> None:
        if self.items:
            lines = "\n  ".join(self.items)
            raise AssertionError(f"{self.title}: {len(self.items)} failure(s)\n  {lines}")


@functools.lru_cache(maxsize=1)
def _golden() -> tuple[GoldenCase, ...]:
    return tuple(load_golden_cases())


def _backend_info(name: str) -> Any:
    from fastweights.backends import list_backends

    for info in list_backends():
        if info.name == name:
            return info
    known = ", ".join(i.name for i in list_backends())
    raise ValueError(f"no backend named {name!r}; registered: {known}")


def _namespace_name(xp: Any) -> str:
    return "numpy" if xp is None else str(getattr(xp, "__name__", xp)).split(".")[-1]


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _expect_dtype(x: Any, dtype: np.dtype, what: str) -> None:
    got = to_numpy(x).dtype
    if got != dtype:
        raise AssertionError(f"{what} has dtype {got}, expected {dtype}")


def _first(state: Any) -> Any:
    return state[0] if isinstance(state, tuple) else state


def _compare(
    got: tuple[Any, Any], want: tuple[Any, Any], *, dtype: np.dtype, form: str, name: str = ""
) -> None:
    """Compare ``(o, final_state)`` pairs, the state possibly being an ``(S, z)`` pair."""
    assert_close(got[0], want[0], dtype=dtype, form=form, name=f"{name} o".strip())
    if want[1] is None:
        return
    if isinstance(want[1], tuple):
        if not isinstance(got[1], tuple) or len(got[1]) != 2:
            raise AssertionError(f"final state {type(got[1]).__name__}, expected an (S, z) pair")
        for part, g, w in zip("Sz", got[1], want[1], strict=True):
            assert_close(g, w, dtype=dtype, form=form, name=f"{name} final {part}".strip())
    else:
        assert_close(got[1], want[1], dtype=dtype, form=form, name=f"{name} final".strip())


class _Suite:
    """The checks of one backend, with the dtypes, forms and namespace to use."""

    def __init__(
        self, name: str, dtypes: Sequence[str], forms: Sequence[str] | None, xp: Any
    ) -> None:
        self.name = name
        self.info = _backend_info(name)
        self.dtypes = [np.dtype(d) for d in dtypes]
        self.only_forms = None if forms is None else tuple(forms)
        self.xp = xp

    # -- helpers ---------------------------------------------------------------------------
    def has(self, op: str, *, step: bool = False) -> bool:
        """Whether the backend implements ``op`` (decoding of it, with ``step``)."""
        return _implemented_as(op) in (self.info.step_ops if step else self.info.ops)

    def forms(self, call: Call) -> list[str]:
        forms = call.forms(self.info.ops.get(_implemented_as(call.op), ()))
        if self.only_forms is not None:
            forms = [f for f in forms if f in self.only_forms]
        return forms

    def run(self, call: Call, **extra: Any) -> tuple[Any, Any]:
        import fastweights

        return call.run(getattr(fastweights, call.op), self.xp, backend=self.name, **extra)

    def reference(self, call: Call, dtype: np.dtype) -> tuple[Any, Any]:
        # Float16 rounding of the inputs is part of the input, not of the error.
        if dtype == np.float16:
            call = call.cast(dtype).cast(np.float64)
        return call.expected()

    def _check_forms(self, fails: _Failures, label: str, call: Call, **extra: Any) -> None:
        for dtype in self.dtypes:
            want = self.reference(call, dtype)
            cast = call.cast(dtype)
            for form in self.forms(call):
                with fails.case(f"{label} {dtype} form={form}"):
                    got = self.run(cast, form=form, output_final_state=True, **extra)
                    _compare(got, want, dtype=dtype, form=form)
                    _expect_dtype(got[0], dtype, "o")
                    _expect_dtype(_first(got[1]), _compute_dtype(dtype), "final state")

    # -- checks ----------------------------------------------------------------------------
    def golden(self, case: GoldenCase) -> None:
        """Every form (and auto) reproduces a golden case, in every dtype."""
        fails = _Failures(f"{self.name}: golden case {case.name}")
        for dtype in self.dtypes:
            call = case.cast(dtype)
            want = self.reference(case, dtype) if dtype == np.float16 else None
            for form in self.forms(case):
                with fails.case(f"{dtype} form={form}"):
                    o, final = self.run(call, form=form, output_final_state=case.has_final_state)
                    if want is not None:
                        _compare(
                            (o, final),
                            want if case.has_final_state else (want[0], None),
                            dtype=dtype,
                            form=form,
                        )
                    elif case.has_final_state:
                        case.check(o, final, dtype=dtype, form=form)
                    else:
                        case.check(o, None, dtype=dtype, form=form)
                        if final is not None:
                            raise AssertionError("final state returned without being asked for")
                    _expect_dtype(o, dtype, "o")
        fails.raise_if_any()

    def forms_agree(self, op: str) -> None:
        """On odd shapes (T % chunk != 0, K != V, HV > H, packed), every form equals the oracle."""
        fails = _Failures(f"{self.name}: forms of {op}")
        rule = RULES[op]
        groups = _groups(op)
        variants: dict[str, Call] = {
            f"B2 T37 H2 G{groups} K12 V7": random_call(op, seed=1, groups=groups),
            "T1": random_call(op, seed=2, length=1),
            "packed 0,1,20,16,0": random_call(op, seed=3, seqlens=[0, 1, 20, 16, 0]),
            "no initial state": random_call(op, seed=10, length=9, initial_state=False),
        }
        if rule.log_decays:
            variants["strong gates"] = random_call(op, seed=4, gates="strong", length=40)
            variants["resets"] = random_call(op, seed=5, gates="reset", initial_state=True)
        beta = next((a for a in rule.args if a.name == "beta"), None)
        if beta is not None and beta.alternatives:
            variants["per-value beta"] = random_call(op, seed=6, beta_per_value=True)
        if "use_qk_l2norm" in rule.common:
            variants["qk l2norm, scale 0.7"] = random_call(
                op, seed=7, use_qk_l2norm=True, scale=0.7
            )
        if op == "linear_attn":
            variants["normalize"] = random_call(op, seed=8, normalize=True)
        if op == "delta_product":
            variants["ungated n=3"] = random_call(op, seed=9, gates="none", num_householder=3)
        for label, call in variants.items():
            self._check_forms(fails, label, call, **_chunk_size(op, 16))
        fails.raise_if_any()

    def streaming(self, op: str) -> None:
        """Running pieces and carrying the final state equals one call."""
        fails = _Failures(f"{self.name}: streaming {op}")
        variants = {"plain": random_call(op, seed=11, groups=_groups(op), length=37)}
        if op == "linear_attn":
            variants["normalize"] = random_call(op, seed=12, normalize=True, length=37)
        cuts = [0, 1, 14, 30, 37]
        for label, call in variants.items():
            for dtype in self.dtypes:
                want = self.reference(call, dtype)
                cast = call.cast(dtype)
                for form in self.forms(call):
                    with fails.case(f"{label} {dtype} form={form}"):
                        state = cast.arrays.get("initial_state")
                        outs = []
                        for a, b in itertools.pairwise(cuts):
                            piece = _slice_tokens(cast, a, b, state)
                            o, state = self.run(
                                piece, form=form, output_final_state=True, **_chunk_size(op, 16)
                            )
                            outs.append(to_numpy(o))
                        _compare(
                            (np.concatenate(outs, axis=1), state), want, dtype=dtype, form=form
                        )
        fails.raise_if_any()

    def decoding(self, op: str) -> None:
        """T calls of ``fastweights.step`` equal one call, in a permuted, larger state pool."""
        fails = _Failures(f"{self.name}: decoding {op}")
        groups = _groups(op)
        variants = {f"G{groups}": random_call(op, seed=21, groups=groups, batch=3, length=9)}
        if "use_qk_l2norm" in RULES[op].common:
            variants["qk l2norm"] = random_call(op, seed=22, batch=2, length=5, use_qk_l2norm=True)
        if op == "linear_attn":
            variants["normalize"] = random_call(op, seed=23, batch=2, length=6, normalize=True)
        for label, call in variants.items():
            for dtype in self.dtypes:
                want = self.reference(call, dtype)
                for pooled in (False, True):
                    with fails.case(f"{label} {dtype} pool={'permuted' if pooled else 'exact'}"):
                        self._decode(op, call.cast(dtype), want, dtype, pooled)
        fails.raise_if_any()

    def _decode(
        self, op: str, call: Call, want: tuple[Any, Any], dtype: np.dtype, pooled: bool
    ) -> None:
        a = call.arrays
        batch = a[RULES[op].arrays[0].name].shape[0]
        rng = np.random.default_rng(0)
        pool_dtype = _compute_dtype(dtype)
        s0 = a["initial_state"]
        parts = s0 if isinstance(s0, tuple) else (s0,)
        size = batch + 3 if pooled else batch
        idx = rng.permutation(size)[:batch] if pooled else np.arange(batch)
        pools = []
        for part in parts:
            pool = rng.standard_normal((size, *part.shape[1:])).astype(pool_dtype)
            pool[idx] = part
            pools.append(pool)
        untouched = [np.delete(p, idx, axis=0) for p in pools]
        xp_pools = tuple(to_namespace(p, self.xp) for p in pools)
        state: Any = xp_pools if isinstance(s0, tuple) else xp_pools[0]
        indices = to_namespace(idx, self.xp) if pooled else None
        o, state, in_place = run_steps(
            call, state, state_indices=indices, backend=self.name, xp=self.xp
        )
        if _namespace_name(self.xp) in _MUTABLE_NAMESPACES and not in_place:
            raise AssertionError("step did not return the state pool it updated in place")
        got_pools = to_numpy(state) if isinstance(state, tuple) else (to_numpy(state),)
        final = tuple(p[idx] for p in got_pools)
        got = (o, final if isinstance(s0, tuple) else final[0])
        _compare(got, want, dtype=dtype, form="recurrent")
        for p, (g, keep) in enumerate(zip(got_pools, untouched, strict=True)):
            _expect_dtype(g, pool_dtype, "state pool")
            if not np.array_equal(np.delete(g, idx, axis=0), keep):
                raise AssertionError(f"pool {p}: rows outside state_indices were modified")

    def inputs(self, op: str) -> None:
        """Inputs are never modified; non-contiguous views give the same results."""
        fails = _Failures(f"{self.name}: inputs of {op}")
        call = random_call(op, seed=31, groups=_groups(op), length=21)
        views = _noncontiguous(call)
        for form in self.forms(call):
            with fails.case(f"form={form}"):
                args, kwargs = call.arguments(self.xp)
                before = [to_numpy(x).copy() for x in _leaves((args, kwargs))]
                import fastweights

                fn = getattr(fastweights, op)
                got = fn(*args, **kwargs, form=form, backend=self.name, output_final_state=True)
                after = [to_numpy(x) for x in _leaves((args, kwargs))]
                for i, (x0, x1) in enumerate(zip(before, after, strict=True)):
                    if not np.array_equal(x0, x1, equal_nan=True):
                        raise AssertionError(f"input {i} was modified")
                if _namespace_name(self.xp) == "numpy":
                    alt = self.run(views, form=form, output_final_state=True)
                    pairs = [("o", alt[0], got[0])] + [
                        ("state", x, y)
                        for x, y in zip(_leaves(alt[1]), _leaves(got[1]), strict=True)
                    ]
                    for what, x, y in pairs:
                        err = relative_rms(x, y)
                        if not err <= tolerance("float64", form):
                            raise AssertionError(
                                f"non-contiguous inputs: {what} differs by {err:.3g}"
                            )
        fails.raise_if_any()

    def errors(self) -> None:
        """Bad input raises ValueError/TypeError before any work; a failed step leaves the pool."""
        import fastweights
        import fastweights.step

        fails = _Failures(f"{self.name}: errors")
        op = (
            "gated_delta_rule" if "gated_delta_rule" in self.info.ops else next(iter(self.info.ops))
        )
        call = random_call(op, seed=41, length=8, initial_state=False)
        fn = getattr(fastweights, op)
        a = call.arrays
        bad: dict[str, tuple[type[Exception], Call, dict[str, Any]]] = {
            "k with another K": (ValueError, _with(call, k=a["k"][..., :-1]), {}),
            "q of rank 3": (ValueError, _with(call, q=a["q"][0]), {}),
            "chunk_size=0": (ValueError, call, {"chunk_size": 0}),
            "form='bogus'": (ValueError, call, {"form": "bogus"}),
            "integer q": (TypeError, _with(call, q=a["q"].astype(np.int64)), {}),
            "cu_seqlens not ending at T": (
                ValueError,
                _with(call, **{n: x[:1] for n, x in a.items()}, cu_seqlens=np.array([0, 3])),
                {},
            ),
        }
        if "g" in a:
            bad["g > 0"] = (ValueError, _with(call, g=np.abs(a["g"]) + 0.1), {})
        for label, (exc, c, extra) in bad.items():
            with fails.case(label):
                args, kwargs = c.arguments(self.xp)
                try:
                    o, _ = fn(*args, **kwargs, **extra, backend=self.name)
                    # A lazy result (Dask) raises the checks that need values as it computes.
                    to_numpy(o)
                except exc:
                    pass
                else:
                    raise AssertionError(f"no {exc.__name__} raised")
        if self.has(op, step=True):
            step = Call(op, token_arrays(call, 0), {})
            batch = a["q"].shape[0]
            hv, dk, dv = a["v"].shape[2], a["q"].shape[3], a["v"].shape[3]
            for label, idx in (("duplicate", [0] * batch), ("out of range", [batch + 5] * batch)):
                with fails.case(f"step state_indices {label}"):
                    pool = np.ones((batch + 1, hv, dk, dv))
                    xp_pool = to_namespace(pool, self.xp)
                    args, kwargs = step.arguments(self.xp)
                    try:
                        getattr(fastweights.step, op)(
                            *args, xp_pool, **kwargs, state_indices=idx, backend=self.name
                        )
                    except ValueError:
                        pass
                    else:
                        raise AssertionError("no ValueError raised")
                    if not np.array_equal(to_numpy(xp_pool), pool):
                        raise AssertionError("the state pool was modified before the error")
        fails.raise_if_any()

    def collect(self) -> list[tuple[str, Check]]:
        checks: list[tuple[str, Check]] = []
        ops = [op for op in OPS if self.has(op)]
        for case in _golden():
            if self.has(case.op):
                checks.append((f"golden-{case.name}", functools.partial(self.golden, case)))
        for op in ops:
            checks.append((f"forms-{op}", functools.partial(self.forms_agree, op)))
            checks.append((f"streaming-{op}", functools.partial(self.streaming, op)))
            checks.append((f"inputs-{op}", functools.partial(self.inputs, op)))
        for op in OPS:
            if self.has(op, step=True):
                checks.append((f"decoding-{op}", functools.partial(self.decoding, op)))
        if ops:
            checks.append(("errors", self.errors))
        return [(f"{self.name}-{label}", fn) for label, fn in checks]


def _implemented_as(op: str) -> str:
    """The op a backend implements for ``op``: an instance rule's parent (``retention`` is
    ``simple_gla``, ``iplr`` and ``rwkv7`` are ``dplr``)."""
    rule = RULES[op]
    while rule.parent is not None:
        rule = RULES[rule.parent]
    return rule.name


def _groups(op: str) -> int:
    """Value heads per key head of the checks' calls: 2, or 1 for a rule that needs
    ``HV == H``."""
    return 1 if RULES[op].same_heads else 2


def _chunk_size(op: str, size: int) -> dict[str, int]:
    """``chunk_size=size`` for a rule that takes it (recurrent-only rules do not)."""
    return {"chunk_size": size} if "chunk_size" in RULES[op].common else {}


def _with(call: Call, **arrays: Any) -> Call:
    return replace(call, arrays={**call.arrays, **arrays})


def _slice_tokens(call: Call, start: int, stop: int, state: Any) -> Call:
    """Tokens ``start:stop`` of an unpacked call, starting from ``state``."""
    n = call.kwargs.get("num_householder", 1)
    per_token = {a.name for a in RULES[call.op].arrays if {"T", "R"} & set(dims_of(a.shape))}
    out: dict[str, Any] = {"initial_state": state}
    for name, x in call.arrays.items():
        if name == "initial_state":
            continue
        if name not in per_token:
            out[name] = x
            continue
        rows = n if (call.op == "delta_product" and name in ("k", "v", "beta")) else 1
        out[name] = x[:, start * rows : stop * rows]
    return replace(call, arrays=out)


def _noncontiguous(call: Call) -> Call:
    """The same call with every 4-D input a non-contiguous view (fused slices, transposes)."""
    out = dict(call.arrays)
    q, k = call.arrays.get("q"), call.arrays.get("k")
    if q is not None and k is not None and q.shape == k.shape:
        fused = np.concatenate([q, k], axis=-1)
        out["q"], out["k"] = fused[..., : q.shape[-1]], fused[..., q.shape[-1] :]
    for name in ("v", "gk", "beta", "x"):
        x = call.arrays.get(name)
        if x is not None and x.ndim == 4:
            out[name] = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if "g" in out:
        out["g"] = np.repeat(call.arrays["g"], 2, axis=-1)[..., ::2]
    return replace(call, arrays=out)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree] if hasattr(tree, "shape") else []


def check_backend(
    name: str,
    *,
    dtypes: Sequence[str] = ("float64", "float32"),
    forms: Sequence[str] | None = None,
    xp: Any = None,
) -> None:
    """Run every conformance check on backend ``name``; one AssertionError lists all failures.

    The checks: each golden case through every form the backend lists for the op (see
    :func:`fastweights.backends.list_backends`) and ``"auto"``, skipping forms the call cannot
    have; random calls with odd shapes, packed sequences, strong gates and resets against the
    naive oracle in every form; streaming in pieces with ``initial_state`` equals one call;
    ``T`` decoding steps through :mod:`fastweights.step` equal one call (also in a permuted,
    larger state pool); inputs are not modified and non-contiguous views give the same
    results; bad input raises ``ValueError``/``TypeError`` and leaves a state pool untouched.

    Parameters
    ----------
    name : str
        Backend name, as registered under the ``fastweights.backends`` entry-point group.
    dtypes : sequence of str
        Input dtypes to test: ``"float64"``, ``"float32"``, ``"float16"``.
    forms : sequence of str, optional
        Restrict to these forms (``"auto"`` included only if listed); default: all.
    xp : module, optional
        Array namespace the backend takes (e.g. ``cupy``); default NumPy.

    Raises
    ------
    AssertionError
        Listing every failed check, or saying the backend is unavailable.

    Examples
    --------
    >>> from fastweights.testing import check_backend
    >>> check_backend("reference", dtypes=("float64",), forms=("recurrent",))
    """
    suite = _Suite(name, dtypes, forms, xp)
    if not suite.info.available:
        raise AssertionError(f"backend {name!r} is unavailable: {suite.info.reason}")
    fails = _Failures(f"backend {name!r} failed conformance")
    for label, check in suite.collect():
        with fails.case(label):
            check()
    fails.raise_if_any()


def parametrize_checks(
    name: str,
    *,
    dtypes: Sequence[str] = ("float64", "float32"),
    forms: Sequence[str] | None = None,
    xp: Any = None,
) -> list[Any]:
    """The checks of :func:`check_backend` as ``pytest.param`` objects, one per check.

    A backend unavailable here gives a single skipped param stating why. Parameters as in
    :func:`check_backend`; needs pytest.

    Returns
    -------
    list of pytest.param
        Each wraps a callable taking no argument that raises AssertionError on failure; ids
        read ``<backend>-<check>-<case or op>``.

    Examples
    --------
    >>> from fastweights.testing import parametrize_checks
    >>> params = parametrize_checks("reference")
    >>> params[0].id
    'reference-golden-linear_attn_basic'

    A plugin's whole conformance test::

        import pytest
        from fastweights.testing import parametrize_checks

        @pytest.mark.parametrize("check", parametrize_checks("mybackend"))
        def test_conformance(check):
            check()
    """
    import pytest

    suite = _Suite(name, dtypes, forms, xp)
    if not suite.info.available:
        skip = pytest.mark.skip(reason=f"backend {name!r} unavailable: {suite.info.reason}")
        return [pytest.param(lambda: None, id=f"{name}-unavailable", marks=skip)]
    return [pytest.param(fn, id=label) for label, fn in suite.collect()]
