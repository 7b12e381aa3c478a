"""API.md: the caller's arrays are never modified (except a decoding state pool, by design), and
non-contiguous inputs (slices of a fused projection, transposed views) are accepted."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from _support import copy_tree, engines, run, step_backends

from fastweights.backends import RULES
from fastweights.testing import (
    OPS,
    Call,
    load_golden_cases,
    random_call,
    relative_rms,
    run_steps,
    tolerance,
)

CASES = load_golden_cases()


def _assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for name, x in before.items():
        y = after[name]
        if isinstance(x, tuple):
            for a, b in zip(x, y, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_inputs_are_not_modified(case: Call) -> None:
    for dtype in (np.float64, np.float32):
        call = case.cast(dtype)
        for backend, form in engines(call):
            before = copy_tree(call.arrays)
            run(call, backend, form, output_final_state=True)
            _assert_unchanged(before, call.arrays)


@pytest.mark.parametrize("op", OPS)
def test_step_modifies_only_the_pool(op: str) -> None:
    call = random_call(op, seed=2, batch=2, length=3, normalize=op == "linear_attn")
    for backend in step_backends(op):
        state = copy_tree(call.arrays["initial_state"])
        before = copy_tree(call.arrays)
        indices = np.array([1, 0])
        run_steps(call, state, state_indices=indices, backend=backend)
        _assert_unchanged(before, call.arrays)
        np.testing.assert_array_equal(indices, [1, 0])


def _noncontiguous(call: Call) -> Call:
    """The same values, every array a strided view."""
    a = call.arrays
    out = dict(a)
    if "q" in a:
        q, k = a["q"], a["k"]
        if q.shape == k.shape:  # a fused projection [q | k], sliced
            fused = np.concatenate([q, k], axis=-1)
            out["q"], out["k"] = fused[..., : q.shape[-1]], fused[..., q.shape[-1] :]
        else:
            out["q"] = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
            out["k"] = np.repeat(k, 2, axis=-1)[..., ::2]
        out["v"] = np.ascontiguousarray(a["v"].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    for name in a:
        if name not in ("q", "k", "v", "beta", "initial_state", "cu_seqlens"):
            out[name] = np.flip(np.flip(a[name], 1).copy(), 1)  # negative strides
    if "beta" in a:
        out["beta"] = np.repeat(a["beta"], 2, axis=-1)[..., ::2]
    s0 = a.get("initial_state")
    if isinstance(s0, np.ndarray):
        out["initial_state"] = np.asfortranarray(s0)
    elif isinstance(s0, tuple):
        out["initial_state"] = tuple(np.asfortranarray(x) for x in s0)
    for name, x in out.items():
        if isinstance(x, np.ndarray) and x.ndim > 1 and name != "cu_seqlens":
            assert not x.flags.c_contiguous, name
    return replace(call, arrays=out)


def _assert_same(x: Any, y: Any, form: str, what: str) -> None:
    if isinstance(y, tuple):
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            _assert_same(a, b, form, f"{what}[{i}]")
        return
    err = relative_rms(x, y)
    assert err <= tolerance("float64", form), f"{what}: non-contiguous inputs differ by {err:.3g}"


def _groups(op: str) -> int:
    return 1 if RULES[op].same_heads else 2


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_noncontiguous_inputs_give_the_same_result(op: str, packed: bool) -> None:
    call = random_call(
        op, seed=3, groups=_groups(op), length=21, seqlens=[5, 0, 16] if packed else None
    )
    views = _noncontiguous(call)
    for backend, form in engines(call):
        want = run(call, backend, form, output_final_state=True, chunk_size=8)
        got = run(views, backend, form, output_final_state=True, chunk_size=8)
        _assert_same(got[0], want[0], form, f"{backend}/{form} o")
        _assert_same(got[1], want[1], form, f"{backend}/{form} state")


@pytest.mark.parametrize("op", OPS)
def test_strided_state_pool_is_updated_in_place(op: str) -> None:
    """A pool that is a view (every other row of a larger array) is written through."""
    call = random_call(op, seed=4, batch=2, length=4)
    views = _noncontiguous(call)
    s0 = call.arrays["initial_state"]
    want = call.expected()
    parts = s0 if isinstance(s0, tuple) else (s0,)
    wants = want[1] if isinstance(s0, tuple) else (want[1],)
    for backend in step_backends(op):
        bigs = [np.zeros((4, *x.shape[1:])) for x in parts]
        pools = tuple(big[::2] for big in bigs)
        for pool, x in zip(pools, parts, strict=True):
            pool[...] = x
        decoded = run_steps(views, pools if len(pools) > 1 else pools[0], backend=backend)
        got = decoded.state if isinstance(decoded.state, tuple) else (decoded.state,)
        assert all(g is p for g, p in zip(got, pools, strict=True))
        _assert_same(decoded.o, want[0], "recurrent", f"{backend} o")
        for big, w in zip(bigs, wants, strict=True):
            _assert_same(big[::2], w, "recurrent", f"{backend} state")
            np.testing.assert_array_equal(big[1::2], 0.0)
            assert big.dtype == np.float64
