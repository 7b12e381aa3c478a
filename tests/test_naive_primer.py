"""Independent checks of the float64 oracles of the primer's rules (issue 14).

``naive.mesa_net``, ``naive.recurrent_delta_rule`` and ``naive.srwm`` are the oracles every
backend of these rules will be held to, so each is checked against something it shares no code
with: fla's MesaNet (the golden2 ``mesa_net_*`` cases), the delta rule (the Recurrent DeltaNet
with its recurrent weights zero), a two-step SRWM worked out by hand, and the structural
properties of a recurrence (packing and streaming change nothing).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

import numpy as np
import pytest

from fastweights.testing import naive, relative_rms

TOL = 1e-12


def _golden2_mesa_net() -> list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """``(name, inputs, kwargs, expected)`` of every golden2 ``mesa_net_*`` case."""
    root = resources.files("fastweights.testing").joinpath("golden2")
    manifest = json.loads(root.joinpath("manifest.json").read_text())
    cases = []
    for entry in manifest:
        if entry.get("op") != "mesa_net":
            continue
        with root.joinpath(f"{entry['name']}.npz").open("rb") as fh, np.load(fh) as data:
            meta = json.loads(str(data["meta"]))
            inputs = {n: np.array(data[n]) for n in meta["inputs"]}
            expected = {n: np.array(data[n]) for n in meta["outputs"]}
        cases.append((entry["name"], inputs, dict(meta["kwargs"]), expected))
    return cases


MESA_CASES = _golden2_mesa_net()


def test_golden2_has_the_mesa_net_cases() -> None:
    names = {c[0] for c in MESA_CASES}
    assert names == {
        "mesa_net_exact",
        "mesa_net_exact_l2norm",
        "mesa_net_varlen",
        "mesa_net_cg",
        "mesa_net_cg_short",
    }


@pytest.mark.parametrize("case", MESA_CASES, ids=[c[0] for c in MESA_CASES])
def test_mesa_net_matches_golden2(case: tuple[str, Any, Any, Any]) -> None:
    _, inputs, kwargs, expected = case
    arrays = dict(inputs)
    init = None
    if "initial_state_kk" in arrays:
        init = (arrays.pop("initial_state_kk"), arrays.pop("initial_state_kv"))
    args = [arrays.pop(n) for n in ("q", "k", "v", "g", "beta", "lamb")]
    o, (h, g) = naive.mesa_net(
        *args, initial_state=init, output_final_state=True, **arrays, **kwargs
    )
    assert o.dtype == np.float64
    assert relative_rms(o, expected["o"]) < TOL
    assert relative_rms(h, expected["final_state_kk"]) < TOL
    assert relative_rms(g, expected["final_state_kv"]) < TOL


# --- random inputs ----------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cu(seqlens: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)


def _mesa_inputs(
    rng: np.random.Generator, batch: int, length: int, *, heads: int = 2, groups: int = 1
) -> tuple[list[np.ndarray], int]:
    """``q, k, v, g, beta, lamb`` with unit q and k, ``lamb >= 0.25``; and ``HV``."""
    hv, dk, dv = heads * groups, 6, 5
    q = _unit(rng.standard_normal((batch, length, heads, dk)))
    k = _unit(rng.standard_normal((batch, length, heads, dk)))
    v = rng.standard_normal((batch, length, hv, dv))
    g = -rng.uniform(0.0, 0.5, (batch, length, hv))
    beta = rng.uniform(0.05, 1.0, (batch, length, hv))
    lamb = rng.uniform(0.25, 1.0, (hv, dk))
    return [q, k, v, g, beta, lamb], hv


def _mesa_state(rng: np.random.Generator, n: int, hv: int, dk: int, dv: int) -> tuple[Any, Any]:
    """A symmetric positive semidefinite ``H_0`` (a sum of ``b k k^T``) and a matching ``G_0``."""
    ks = _unit(rng.standard_normal((n, hv, 4, dk)))
    w = rng.uniform(0.1, 1.0, (n, hv, 4))
    h0 = np.einsum("nhj,nhjk,nhjl->nhkl", w, ks, ks)
    g0 = np.einsum("nhj,nhjk,nhjv->nhkv", w, ks, rng.standard_normal((n, hv, 4, dv)))
    return h0, g0


def _rdr_inputs(rng: np.random.Generator, batch: int, length: int, *, zero_r: bool = False) -> Any:
    """``q, k, v, beta, R_q, R_k, R_v, r_beta`` (``H = 2, K = 6, V = 5``)."""
    h, dk, dv = 2, 6, 5
    q = rng.standard_normal((batch, length, h, dk))
    k = rng.standard_normal((batch, length, h, dk))
    v = rng.standard_normal((batch, length, h, dv))
    beta = rng.standard_normal((batch, length, h))
    rec = [
        0.5 * rng.standard_normal((h, dk, dv)),
        0.5 * rng.standard_normal((h, dk, dv)),
        0.5 * rng.standard_normal((h, dv, dv)),
        0.5 * rng.standard_normal((h, dv)),
    ]
    if zero_r:
        rec = [np.zeros_like(r) for r in rec]
    return [q, k, v, beta, *rec]


def _rdr_state(rng: np.random.Generator, n: int) -> tuple[Any, Any]:
    return 0.3 * rng.standard_normal((n, 2, 6, 5)), rng.standard_normal((n, 2, 5))


def _srwm_inputs(rng: np.random.Generator, batch: int, length: int) -> tuple[Any, Any]:
    """``x [B, T, 2, 3]`` and ``W0 [2, 3, 4 + 2*3 + 4]``."""
    return rng.standard_normal((batch, length, 2, 3)), 0.5 * rng.standard_normal((2, 3, 14))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _assert_states(got: Any, want: Any, tol: float = TOL) -> None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert relative_rms(a, b) < tol


def _stack(states: list[Any]) -> Any:
    """Concatenate per-sequence states (arrays or tuples) along ``N``."""
    if isinstance(states[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*states, strict=True))
    return np.concatenate(states)


def _rows(state: Any, i: int) -> Any:
    """Row ``i`` of a state (array or tuple), keeping the ``N`` axis."""
    if isinstance(state, tuple):
        return tuple(s[i : i + 1] for s in state)
    return state[i : i + 1]


# --- (b) the Recurrent DeltaNet without recurrence is the delta rule ---------------------------


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("seqlens", [None, [4, 0, 7, 3]], ids=["batched", "packed"])
def test_recurrent_delta_rule_without_recurrence_is_delta_rule(
    with_state: bool, seqlens: list[int] | None
) -> None:
    rng = np.random.default_rng(1)
    batch, length = (2, 9) if seqlens is None else (1, sum(seqlens))
    cu = None if seqlens is None else _cu(seqlens)
    n = batch if seqlens is None else len(seqlens)
    q, k, v, beta, *rec = _rdr_inputs(rng, batch, length, zero_r=True)
    init = _rdr_state(rng, n) if with_state else None
    o, (s, last) = naive.recurrent_delta_rule(
        q, k, v, beta, *rec, initial_state=init, output_final_state=True, cu_seqlens=cu
    )
    want_o, want_s = naive.delta_rule(
        _softmax(q),
        _softmax(k),
        v,
        _sigmoid(beta),
        scale=1.0,
        initial_state=None if init is None else init[0],
        output_final_state=True,
        cu_seqlens=cu,
    )
    assert relative_rms(o, want_o) < TOL
    assert relative_rms(s, want_s) < TOL
    # The second part of the state is each sequence's last output (the given one when empty).
    segments = (
        [(b, 0, length) for b in range(batch)]
        if cu is None
        else [(0, int(cu[i]), int(cu[i + 1])) for i in range(n)]
    )
    for i, (row, start, end) in enumerate(segments):
        if end > start:
            np.testing.assert_array_equal(last[i], o[row, end - 1])
        else:
            want = np.zeros((2, 5)) if init is None else init[1][i]
            np.testing.assert_array_equal(last[i], want)


def test_recurrent_delta_rule_recurrence_matters() -> None:
    """With recurrent weights, the previous output changes the result (and ``o_0`` does)."""
    rng = np.random.default_rng(2)
    args = _rdr_inputs(rng, 1, 6)
    s0, o0 = _rdr_state(rng, 1)
    o_rec, _ = naive.recurrent_delta_rule(*args, initial_state=(s0, o0))
    o_zero_o0, _ = naive.recurrent_delta_rule(*args, initial_state=(s0, 0 * o0))
    plain = [*args[:4], *(np.zeros_like(r) for r in args[4:])]
    o_plain, _ = naive.recurrent_delta_rule(*plain, initial_state=(s0, o0))
    assert relative_rms(o_rec, o_plain) > 1e-2
    assert relative_rms(o_rec, o_zero_o0) > 1e-3


def test_recurrent_delta_rule_with_recurrence_by_plain_floats() -> None:
    """One head, K = 2, V = 2, three tokens, every recurrent weight nonzero: the issue's
    equations with plain Python floats and index loops (``(R_q h)_i = sum_j R_q[i][j] h_j``,
    ``(R_v h)_i = sum_j R_v[i][j] h_j``), against the vectorised oracle."""
    qs = [[0.3, -0.2], [1.0, 0.5], [-0.4, 0.9]]
    ks = [[0.1, 0.7], [-0.6, 0.2], [0.8, -0.3]]
    vs = [[1.0, -1.0], [0.5, 2.0], [-1.5, 0.25]]
    betas = [0.2, -0.5, 1.0]
    R_q = [[0.5, -0.3], [0.2, 0.4]]
    R_k = [[-0.7, 0.1], [0.3, 0.6]]
    R_v = [[0.9, -0.2], [0.4, 0.3]]
    r_beta = [0.6, -0.8]
    S = [[0.2, -0.1], [0.05, 0.3]]  # S[i][j]: key i, value j
    last = [0.5, -0.25]
    scale = 0.7

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(a) for a in z]
        return [a / sum(e) for a in e]

    def matvec(m: list[list[float]], x: list[float]) -> list[float]:
        return [sum(m[i][j] * x[j] for j in range(2)) for i in range(2)]

    s0, o0 = [row[:] for row in S], last[:]
    outs = []
    for t in range(3):
        h = [math.tanh(a) for a in last]
        qh = softmax([a + b for a, b in zip(qs[t], matvec(R_q, h), strict=True)])
        kh = softmax([a + b for a, b in zip(ks[t], matvec(R_k, h), strict=True)])
        vh = [a + b for a, b in zip(vs[t], matvec(R_v, h), strict=True)]
        b = 1.0 / (1.0 + math.exp(-(betas[t] + r_beta[0] * h[0] + r_beta[1] * h[1])))
        # S^T kh: value j reads sum_i S[i][j] kh[i]
        read = [S[0][j] * kh[0] + S[1][j] * kh[1] for j in range(2)]
        S = [[S[i][j] + b * kh[i] * (vh[j] - read[j]) for j in range(2)] for i in range(2)]
        last = [scale * (S[0][j] * qh[0] + S[1][j] * qh[1]) for j in range(2)]
        outs.append(last)

    def arr(x: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.array(x, dtype=np.float64).reshape(shape)

    o, (s_fin, o_fin) = naive.recurrent_delta_rule(
        arr(qs, (1, 3, 1, 2)),
        arr(ks, (1, 3, 1, 2)),
        arr(vs, (1, 3, 1, 2)),
        arr(betas, (1, 3, 1)),
        arr(R_q, (1, 2, 2)),
        arr(R_k, (1, 2, 2)),
        arr(R_v, (1, 2, 2)),
        arr(r_beta, (1, 2)),
        scale=scale,
        initial_state=(arr(s0, (1, 1, 2, 2)), arr(o0, (1, 1, 2))),
        output_final_state=True,
    )
    np.testing.assert_allclose(o.reshape(3, 2), outs, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(s_fin.reshape(2, 2), S, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(o_fin.reshape(2), last, rtol=1e-13, atol=1e-15)


# --- (c) a two-step SRWM by hand --------------------------------------------------------------


def test_srwm_two_steps_by_hand() -> None:
    """D = 2, V = 1, one head: W has 2 rows and V + 2D + 4 = 9 columns, ``y | k k | q q | b b b
    b``. With L = ln 3: softmax([L, 0]) = [3/4, 1/4], softmax([0, 0]) = [1/2, 1/2],
    sigmoid(L) = 3/4, sigmoid(-L) = 1/4, sigmoid(0) = 1/2.
    """
    L = math.log(3.0)
    w0 = [
        # y    k1      k2   q1   q2     b1      b2   b3       b4
        [2.0, 2 * L, 0.0, 0.0, 0.0, 2 * L, 0.0, -2 * L, 0.0],
        [4.0, 0.0, 0.0, 0.0, 2 * L, 0.0, 0.0, 0.0, 2 * L],
    ]
    xs = [[0.0, 0.0], [L, 0.0]]

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(a) for a in z]
        return [a / sum(e) for a in e]

    def sigmoid(a: float) -> float:
        return 1.0 / (1.0 + math.exp(-a))

    def read(w: list[list[float]], p: list[float]) -> list[float]:
        """W^T p: p[0] * row 0 + p[1] * row 1."""
        return [p[0] * w[0][c] + p[1] * w[1][c] for c in range(9)]

    def step(w: list[list[float]], x: list[float]) -> tuple[float, list[list[float]], dict]:
        out = read(w, softmax(x))
        y, kt, qt, bt = out[0], out[1:3], out[3:5], out[5:9]
        pk, pq = softmax(kt), softmax(qt)
        vt, vbar = read(w, pq), read(w, pk)
        lr = [sigmoid(bt[0])] + [sigmoid(bt[1])] * 2 + [sigmoid(bt[2])] * 2
        lr += [sigmoid(bt[3])] * 4
        delta = [lr[c] * (vt[c] - vbar[c]) for c in range(9)]
        new = [[w[r][c] + pk[r] * delta[c] for c in range(9)] for r in range(2)]
        return y, new, {"out": out, "pk": pk, "pq": pq, "lr": lr, "delta": delta}

    # Step 1, x = [0, 0]: phi(x) = [1/2, 1/2], so W0^T phi(x) is the mean of the two rows:
    # y = 3, k = [L, 0], q = [0, L], beta = [L, 0, -L, L].
    y1, w1, s1 = step(w0, xs[0])
    assert y1 == pytest.approx(3.0, abs=1e-15)
    np.testing.assert_allclose(s1["out"], [3, L, 0, 0, L, L, 0, -L, L], atol=1e-15)
    # phi(k) = [3/4, 1/4], phi(q) = [1/4, 3/4]; lr = sigmoid(beta) = [3/4, 1/2, 1/4, 3/4] per
    # block (y; k; q; beta).
    np.testing.assert_allclose(s1["pk"], [0.75, 0.25], atol=1e-15)
    np.testing.assert_allclose(s1["pq"], [0.25, 0.75], atol=1e-15)
    np.testing.assert_allclose(s1["lr"], [0.75, 0.5, 0.5, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75])
    # v - vbar = (phi(q) - phi(k))^T W0 = (row 1 - row 0) / 2 = [1 | -L, 0 | 0, L | -L, 0, L, L];
    # times lr: delta = [3/4 | -L/2, 0 | 0, L/4 | -3L/4, 0, 3L/4, 3L/4].
    delta1 = [0.75, -L / 2, 0, 0, L / 4, -3 * L / 4, 0, 3 * L / 4, 3 * L / 4]
    np.testing.assert_allclose(s1["delta"], delta1, atol=1e-15)
    # W1 = W0 + phi(k) delta^T: row 0 gains 3/4 delta, row 1 gains 1/4 delta.
    w1_hand = [
        [2 + 9 / 16, 13 * L / 8, 0, 0, 3 * L / 16, 23 * L / 16, 0, -23 * L / 16, 9 * L / 16],
        [4 + 3 / 16, -L / 8, 0, 0, 33 * L / 16, -3 * L / 16, 0, 3 * L / 16, 35 * L / 16],
    ]
    np.testing.assert_allclose(w1, w1_hand, atol=1e-15)

    # Step 2, x = [L, 0]: phi(x) = [3/4, 1/4]. The output reads W1 (before this step's write):
    # y2 = 3/4 * 41/16 + 1/4 * 67/16 = 190/64 = 95/32.
    y2, w2, s2 = step(w1, xs[1])
    assert y2 == pytest.approx(95 / 32, abs=1e-15)
    # k2 = 3/4 [13L/8, 0] + 1/4 [-L/8, 0] = [19L/16, 0]; q2 = [0, 3/4 3L/16 + 1/4 33L/16] =
    # [0, 21L/32]; beta2 = 3/4 [23L/16, 0, -23L/16, 9L/16] + 1/4 [-3L/16, 0, 3L/16, 35L/16]
    # = [33L/32, 0, -33L/32, 31L/32].
    np.testing.assert_allclose(s2["out"][1:3], [19 * L / 16, 0], atol=1e-15)
    np.testing.assert_allclose(s2["out"][3:5], [0, 21 * L / 32], atol=1e-15)
    np.testing.assert_allclose(
        s2["out"][5:9], [33 * L / 32, 0, -33 * L / 32, 31 * L / 32], atol=1e-15
    )
    # The rest of step 2 (softmaxes of multiples of L) is left to the plain-float code above.

    o, w_final = naive.srwm(
        np.array(xs).reshape(1, 2, 1, 2), np.array(w0)[None], output_final_state=True
    )
    np.testing.assert_allclose(o.reshape(2), [3.0, 95 / 32], rtol=1e-14)
    np.testing.assert_allclose(w_final.reshape(2, 9), w2, rtol=1e-14, atol=1e-15)
    # (A rule that wrote before reading would output W1's y at step 1: (41/16 + 67/16) / 2 =
    # 27/8, not 3.)


def test_srwm_initial_state_replaces_w0() -> None:
    rng = np.random.default_rng(3)
    x, w0 = _srwm_inputs(rng, 2, 5)
    other = 0.5 * rng.standard_normal((2, *w0.shape))
    o_init, s_init = naive.srwm(x, 0 * w0, initial_state=other, output_final_state=True)
    for b in range(2):
        o_b, s_b = naive.srwm(x[b : b + 1], other[b], output_final_state=True)
        assert relative_rms(o_init[b : b + 1], o_b) < TOL
        _assert_states(s_init[b : b + 1], s_b)


# --- (d) packing and streaming ---------------------------------------------------------------

SEQLENS = [5, 0, 8, 3]


def _cases(rng: np.random.Generator, batch: int, length: int, n_states: int) -> dict[str, Any]:
    """``op -> (fn, args, kwargs, initial_state, slice_state)`` for the three oracles."""
    mesa, hv = _mesa_inputs(rng, batch, length, groups=2)
    return {
        "mesa_net_exact": (
            naive.mesa_net,
            mesa,
            {},
            _mesa_state(rng, n_states, hv, 6, 5),
        ),
        "mesa_net_cg": (
            naive.mesa_net,
            mesa,
            {"solver": "cg", "max_cg_iterations": 7, "scale": 1.0},
            _mesa_state(rng, n_states, hv, 6, 5),
        ),
        "recurrent_delta_rule": (
            naive.recurrent_delta_rule,
            _rdr_inputs(rng, batch, length),
            {},
            _rdr_state(rng, n_states),
        ),
        "srwm": (
            naive.srwm,
            list(_srwm_inputs(rng, batch, length)),
            {},
            0.5 * rng.standard_normal((n_states, 2, 3, 14)),
        ),
    }


# Arguments indexed by token (the rest, lamb, R_*, r_beta, W0, are per head).
_PER_TOKEN = {"mesa_net": 5, "recurrent_delta_rule": 4, "srwm": 1}


def _split(fn: Any, args: list[Any], sl: slice, rows: slice = slice(None)) -> list[Any]:
    n = _PER_TOKEN[fn.__name__]
    return [a[rows, sl] for a in args[:n]] + list(args[n:])


OPS = ["mesa_net_exact", "mesa_net_cg", "recurrent_delta_rule", "srwm"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_equals_separate(op: str, with_state: bool) -> None:
    rng = np.random.default_rng(4)
    cu = _cu(SEQLENS)
    fn, args, kw, init = _cases(rng, 1, sum(SEQLENS), len(SEQLENS))[op]
    init = init if with_state else None
    o, state = fn(*args, **kw, initial_state=init, output_final_state=True, cu_seqlens=cu)
    finals = []
    for i in range(len(SEQLENS)):
        piece = _split(fn, args, slice(int(cu[i]), int(cu[i + 1])))
        o_i, s_i = fn(
            *piece,
            **kw,
            initial_state=None if init is None else _rows(init, i),
            output_final_state=True,
        )
        assert o_i.shape[1] == SEQLENS[i]
        if SEQLENS[i]:
            assert relative_rms(o[:, int(cu[i]) : int(cu[i + 1])], o_i) < TOL
        finals.append(s_i)
    _assert_states(state, _stack(finals))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cut", [0, 4, 11])
def test_streaming_equals_one_call(op: str, cut: int) -> None:
    rng = np.random.default_rng(5)
    fn, args, kw, init = _cases(rng, 2, 11, 2)[op]
    o, state = fn(*args, **kw, initial_state=init, output_final_state=True)
    o1, s1 = fn(*_split(fn, args, slice(0, cut)), **kw, initial_state=init, output_final_state=True)
    o2, s2 = fn(
        *_split(fn, args, slice(cut, None)), **kw, initial_state=s1, output_final_state=True
    )
    assert relative_rms(np.concatenate([o1, o2], axis=1), o) < TOL
    _assert_states(s2, state)


def test_outputs_keep_the_input_dtype_and_states_are_float64() -> None:
    rng = np.random.default_rng(6)
    for op, (fn, args, kw, _) in _cases(rng, 1, 4, 1).items():
        if op == "srwm":
            args = [args[0].astype(np.float32), args[1]]
        else:
            args = [a.astype(np.float32) for a in args]
        o, state = fn(*args, **kw, output_final_state=True)
        assert o.dtype == np.float32, op
        for s in state if isinstance(state, tuple) else (state,):
            assert s.dtype == np.float64, op


# --- (e) MesaNet's CG against the exact solve --------------------------------------------------


def test_mesa_net_cg_stalls_near_the_exact_solve() -> None:
    """fla's CG (``1e-5`` in both denominators, ``x0 = 0``, no early stop) on unit keys and
    queries with ``lamb >= 0.25``: about 5e-4 from the exact solve at 30 iterations and still
    about 3e-4 at 100 (the stall RULES2.md documents: the ``1e-5`` terms bias it), 6e-2 at 3.
    """
    rng = np.random.default_rng(7)
    dk = 16
    q = _unit(rng.standard_normal((1, 40, 2, dk)))
    k = _unit(rng.standard_normal((1, 40, 2, dk)))
    v = rng.standard_normal((1, 40, 2, dk))
    g = -rng.uniform(0.0, 0.5, (1, 40, 2))
    beta = rng.uniform(0.05, 1.0, (1, 40, 2))
    lamb = rng.uniform(0.25, 1.0, (2, dk))
    args = (q, k, v, g, beta, lamb)
    exact, s_exact = naive.mesa_net(*args, scale=1.0, output_final_state=True)

    def cg_error(iterations: int) -> float:
        o, s = naive.mesa_net(
            *args,
            scale=1.0,
            solver="cg",
            max_cg_iterations=iterations,
            output_final_state=True,
        )
        # The states do not depend on the solver.
        _assert_states(s, s_exact, tol=1e-15)
        return relative_rms(o, exact)

    e3, e30, e100 = cg_error(3), cg_error(30), cg_error(100)
    assert e30 < 1e-3
    assert e3 > 1e-2
    assert 1e-5 < e100 < e30  # still improving, slowly, but nowhere near the float64 solve


def test_mesa_net_rejects_an_unknown_solver() -> None:
    rng = np.random.default_rng(8)
    args, _ = _mesa_inputs(rng, 1, 2)
    with pytest.raises(ValueError, match="solver"):
        naive.mesa_net(*args, solver="lu")
