"""The primer's rules (issue 14): MesaNet, the Recurrent DeltaNet and the self-referential
weight matrix. Their values are checked on every backend by the golden and conformance suites;
here: what each rule adds to validation, and the properties that tie their forms, steps and
packed calls together, on every backend that runs them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastweights
import fastweights.step
from fastweights.testing import assert_close, naive, random_call, run_steps

PRIMER = ("mesa_net", "recurrent_delta_rule", "srwm")
BACKENDS = [
    b.name
    for b in fastweights.backends.list_backends()
    if b.available and b.name in ("reference", "numba")
]


def _mesa(**over: Any) -> dict[str, Any]:
    call = random_call("mesa_net", seed=3, batch=2, length=6, initial_state=False)
    return {**call.arrays, **over}


def _rdr(**over: Any) -> dict[str, Any]:
    call = random_call("recurrent_delta_rule", seed=4, batch=2, length=6, groups=1)
    return {**call.arrays, **over}


def _srwm(**over: Any) -> dict[str, Any]:
    call = random_call("srwm", seed=5, batch=2, length=6, initial_state=False)
    return {**call.arrays, **over}


BAD_CALLS = {
    "lamb with another K": (
        "mesa_net",
        lambda: _mesa(lamb=np.ones((2, 11))),
        ValueError,
        r"lamb must have shape \[HV, K\]",
    ),
    "lamb zero": (
        "mesa_net",
        lambda: _mesa(lamb=np.zeros((2, 12))),
        ValueError,
        "lamb must be positive",
    ),
    "lamb NaN": (
        "mesa_net",
        lambda: _mesa(lamb=np.full((2, 12), np.nan)),
        ValueError,
        "lamb must be positive",
    ),
    "g > 0": (
        "mesa_net",
        lambda: _mesa(g=np.abs(_mesa()["g"]) + 0.1),
        ValueError,
        "g is a log-decay",
    ),
    "solver unknown": ("mesa_net", lambda: _mesa(solver="lu"), ValueError, "solver must be one of"),
    "solver not a str": ("mesa_net", lambda: _mesa(solver=1), TypeError, "solver must be a str"),
    "max_cg_iterations 0": (
        "mesa_net",
        lambda: _mesa(max_cg_iterations=0),
        ValueError,
        "max_cg_iterations must be >= 1",
    ),
    "max_cg_iterations float": (
        "mesa_net",
        lambda: _mesa(max_cg_iterations=3.0),
        TypeError,
        "max_cg_iterations must be an integer",
    ),
    "mesa state not a pair": (
        "mesa_net",
        lambda: _mesa(initial_state=np.zeros((2, 2, 12, 12))),
        TypeError,
        r"initial_state of mesa_net must be the tuple \(H, G\)",
    ),
    "mesa H of another shape": (
        "mesa_net",
        lambda: _mesa(initial_state=(np.zeros((2, 2, 12, 7)), np.zeros((2, 2, 12, 7)))),
        ValueError,
        r"initial_state\[0\] must have shape",
    ),
    "mesa parallel form": ("mesa_net", lambda: _mesa(form="parallel"), ValueError, "parallel"),
    "R_q with another K": (
        "recurrent_delta_rule",
        lambda: _rdr(R_q=np.zeros((2, 11, 7))),
        ValueError,
        r"R_q must have shape \[H, K, V\]",
    ),
    "R_v not square": (
        "recurrent_delta_rule",
        lambda: _rdr(R_v=np.zeros((2, 7, 6))),
        ValueError,
        r"R_v must have shape \[H, V, V\]",
    ),
    "r_beta per value head missing": (
        "recurrent_delta_rule",
        lambda: _rdr(r_beta=np.zeros((2,))),
        ValueError,
        r"r_beta must have shape \[H, V\]",
    ),
    "grouped value heads": (
        "recurrent_delta_rule",
        lambda: _rdr(v=np.zeros((2, 6, 4, 7)), beta=np.zeros((2, 6, 4)), initial_state=None),
        ValueError,
        "needs one value head per query/key head",
    ),
    "K = 0": (
        "recurrent_delta_rule",
        lambda: _rdr(
            q=np.zeros((2, 6, 2, 0)),
            k=np.zeros((2, 6, 2, 0)),
            R_q=np.zeros((2, 0, 7)),
            R_k=np.zeros((2, 0, 7)),
            initial_state=None,
        ),
        ValueError,
        "needs K >= 1",
    ),
    "rdr chunk form": ("recurrent_delta_rule", lambda: _rdr(form="chunk"), ValueError, "chunk"),
    "rdr use_qk_l2norm": (
        "recurrent_delta_rule",
        lambda: _rdr(use_qk_l2norm=True),
        TypeError,
        "use_qk_l2norm",
    ),
    "rdr chunk_size": (
        "recurrent_delta_rule",
        lambda: _rdr(chunk_size=16),
        TypeError,
        "chunk_size",
    ),
    "rdr state not a pair": (
        "recurrent_delta_rule",
        lambda: _rdr(initial_state=np.zeros((2, 2, 12, 7))),
        TypeError,
        r"must be the tuple \(S, o\)",
    ),
    "W0 too narrow": (
        "srwm",
        lambda: _srwm(W0=np.zeros((2, 12, 2 * 12 + 4))),
        ValueError,
        "W0 must have V \\+ 2D \\+ 4 columns",
    ),
    "W0 of other heads": (
        "srwm",
        lambda: _srwm(W0=np.zeros((3, 12, 35))),
        ValueError,
        r"W0 must have shape \[H, D, V \+ 2D \+ 4\]",
    ),
    "x of rank 3": (
        "srwm",
        lambda: _srwm(x=np.zeros((6, 2, 12))),
        ValueError,
        "x must have rank 4",
    ),
    "srwm state of another width": (
        "srwm",
        lambda: _srwm(initial_state=np.zeros((2, 2, 12, 30))),
        ValueError,
        r"initial_state must have shape \[N, H, K, W\]",
    ),
    "srwm scale": ("srwm", lambda: _srwm(scale=1.0), TypeError, "scale"),
    "srwm integer x": (
        "srwm",
        lambda: _srwm(x=np.zeros((2, 6, 2, 12), dtype=np.int64)),
        TypeError,
        "x must have a real floating dtype",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", sorted(BAD_CALLS))
def test_bad_input_names_the_argument(label: str, backend: str) -> None:
    op, make, error, match = BAD_CALLS[label]
    arrays = make()
    before = {n: np.array(x, copy=True) for n, x in arrays.items() if isinstance(x, np.ndarray)}
    with pytest.raises(error, match=match):
        getattr(fastweights, op)(**arrays, backend=backend)
    for name, x in before.items():
        np.testing.assert_array_equal(arrays[name], x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_steps_leave_the_pools(backend: str) -> None:
    call = random_call("mesa_net", seed=6, batch=2, length=1, initial_state=False)
    a = {n: x[:, 0] if n in ("q", "k", "v", "g", "beta") else x for n, x in call.arrays.items()}
    H, G = np.ones((3, 2, 12, 12)), np.ones((3, 2, 12, 7))
    for pools, kwargs, error in (
        ((H, G), {"state_indices": [0, 0]}, ValueError),
        ((H, G), {"lamb": -a["lamb"]}, ValueError),
        ((H, G[:, :, :, :6]), {"state_indices": [0, 1]}, ValueError),
        ((H,), {"state_indices": [0, 1]}, TypeError),
    ):
        args = {**a, **kwargs}
        with pytest.raises(error):
            fastweights.step.mesa_net(**args, state=pools, backend=backend)
        assert np.all(H == 1) and np.all(G == 1)
    W = np.ones((3, 2, 4, 1 + 2 * 4 + 4))
    x = np.zeros((2, 2, 4))
    with pytest.raises(TypeError, match="W0"):
        fastweights.step.srwm(x, W, W0=W[0], backend=backend)  # the pool holds the weight
    with pytest.raises(ValueError, match=r"state must have shape \[P, H, D"):
        fastweights.step.srwm(x, W[:, :, :3], state_indices=[0, 1], backend=backend)
    assert np.all(W == 1)


def test_recurrent_delta_rule_without_recurrence_is_the_delta_rule() -> None:
    call = random_call("recurrent_delta_rule", seed=7, groups=1)
    a = dict(call.arrays)
    for name in ("R_q", "R_k", "R_v", "r_beta"):
        a[name] = np.zeros_like(a[name])
    S0, _ = a.pop("initial_state")
    o, (S, _) = fastweights.recurrent_delta_rule(
        **a, initial_state=(S0, np.zeros(S0.shape[:2] + S0.shape[3:])), output_final_state=True
    )

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    want, S_want = fastweights.delta_rule(
        softmax(a["q"]),
        softmax(a["k"]),
        a["v"],
        1 / (1 + np.exp(-a["beta"])),
        scale=1.0,
        initial_state=S0,
        output_final_state=True,
    )
    assert_close(o, want, dtype="float64", form="recurrent")
    assert_close(S, S_want, dtype="float64", form="recurrent")


def test_mesa_net_chunk_form_on_long_sequences_with_resets() -> None:
    """The chunk form's segment sums across chunk boundaries, resets and strong decays."""
    call = random_call("mesa_net", seed=8, length=150, gates="reset")
    want = call.expected()
    for chunk_size in (1, 16, 64, 150):
        got = call.run(
            fastweights.mesa_net,
            form="chunk",
            chunk_size=chunk_size,
            backend="reference",
            output_final_state=True,
        )
        assert_close(got[0], want[0], dtype="float64", form="chunk")
        for x, ref in zip(got[1], want[1], strict=True):
            assert_close(x, ref, dtype="float64", form="chunk")


def test_mesa_net_cg_stalls_near_the_exact_solve() -> None:
    """fla's CG with its 1e-5 terms: close to the exact read-out, but not equal to it."""
    call = random_call("mesa_net", seed=9, length=40, use_qk_l2norm=True, scale=1.0)
    exact, _ = call.run(fastweights.mesa_net, backend="reference")
    cg, _ = call.run(fastweights.mesa_net, backend="reference", solver="cg")
    cg_naive, _ = call.run(naive.mesa_net, solver="cg")
    err = np.linalg.norm(cg - exact) / np.linalg.norm(exact)
    assert 1e-7 < err < 1e-2
    assert_close(cg, cg_naive, dtype="float64", form="recurrent")


def test_srwm_reads_before_it_writes() -> None:
    call = random_call("srwm", seed=10, length=3, initial_state=False)
    x, W0 = call.arrays["x"], call.arrays["W0"]
    o, W = fastweights.srwm(x, W0, output_final_state=True)
    phi = np.exp(x[:, 0]) / np.exp(x[:, 0]).sum(axis=-1, keepdims=True)
    V = o.shape[-1]
    np.testing.assert_allclose(o[:, 0], np.einsum("hdm,bhd->bhm", W0, phi)[..., :V])
    assert not np.allclose(W, W0)


@settings(max_examples=12, deadline=None)
@given(
    op=st.sampled_from(PRIMER),
    backend=st.sampled_from(BACKENDS),
    lengths=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    cut=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_packed_streamed_and_stepped_calls_equal_one_call(
    op: str, backend: str, lengths: list[int], cut: int, seed: int
) -> None:
    """Packed sequences equal separate calls; a sequence cut in two pieces (carrying the final
    state) equals one call; T decoding steps equal one call."""
    fn = getattr(fastweights, op)
    packed = random_call(op, seed=seed, seqlens=lengths, groups=1, key_dim=5, value_dim=3)
    o, finals = packed.run(fn, backend=backend, output_final_state=True)
    cu = packed.arrays["cu_seqlens"]
    states = packed.arrays["initial_state"]
    per_token = {a.name for a in fastweights.backends.RULES[op].arrays if "T" in a.shape}
    for i in range(len(lengths)):
        one = {
            n: (x[:, cu[i] : cu[i + 1]] if n in per_token else x)
            for n, x in packed.arrays.items()
            if n not in ("cu_seqlens", "initial_state")
        }
        state = (
            tuple(s[i : i + 1] for s in states) if isinstance(states, tuple) else states[i : i + 1]
        )
        o_i, final_i = fn(**one, initial_state=state, output_final_state=True, backend=backend)
        assert_close(o[:, cu[i] : cu[i + 1]], o_i, dtype="float64", form="recurrent")
        for got, want in zip(_parts(finals), _parts(final_i), strict=True):
            assert_close(got[i : i + 1], want, dtype="float64", form="recurrent")

    call = random_call(op, seed=seed, batch=2, length=9, groups=1, key_dim=5, value_dim=3)
    whole = call.run(fn, backend=backend, output_final_state=True)
    head = {n: (x[:, :cut] if n in per_token else x) for n, x in call.arrays.items()}
    o1, s1 = fn(**head, output_final_state=True, backend=backend)
    tail = {n: (x[:, cut:] if n in per_token else x) for n, x in call.arrays.items()}
    tail["initial_state"] = s1
    o2, s2 = fn(**tail, output_final_state=True, backend=backend)
    assert_close(np.concatenate([o1, o2], axis=1), whole[0], dtype="float64", form="recurrent")
    for got, want in zip(_parts(s2), _parts(whole[1]), strict=True):
        assert_close(got, want, dtype="float64", form="recurrent")

    pool = tuple(np.array(s, copy=True) for s in _parts(call.arrays["initial_state"]))
    decoded = run_steps(call, pool if len(pool) > 1 else pool[0], backend=backend)
    assert decoded.in_place
    assert_close(decoded.o, whole[0], dtype="float64", form="recurrent")
    for got, want in zip(_parts(decoded.state), _parts(whole[1]), strict=True):
        assert_close(got, want, dtype="float64", form="recurrent")


def _parts(state: Any) -> tuple[Any, ...]:
    return tuple(state) if isinstance(state, tuple) else (state,)
