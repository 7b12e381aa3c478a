"""The chunk form's backward of the delta family (``chunk_vjp``) at the Problem level.

Against central finite differences of the forward ``chunk`` (float64, ``sum(o * w_o) +
sum(S * w_s)`` with random cotangents, one random direction per input) for every kind of rule:
Hebbian and delta, without a gate, with a per-head gate and a per-key-channel gate; chunk
sizes that do and do not divide the length, chunks longer than a sub-block, the one-chunk
(parallel) form, zero and random initial states, gates of exactly 0, ``-inf`` gates (resets:
gradient exactly 0 there, finite elsewhere), strong decays (no overflow, no NaN), ``R == 0``;
against the recurrent form's backward to 1e-10, and on array-api-strict.
"""

from __future__ import annotations

import zlib
from typing import Any

import array_api_compat
import numpy as np
import pytest

from fastweights.rules.delta._layout import Problem
from fastweights.rules.delta.chunk import chunk
from fastweights.rules.delta.chunk_vjp import chunk_vjp
from fastweights.rules.delta.recurrent_vjp import recurrent_vjp

XP = array_api_compat.array_namespace(np.empty(0))
# (name, gate width: None, per head 1 or per key channel "K", erase)
RULES = [
    ("linear_attn", None, False),
    ("simple_gla", 1, False),
    ("gla", "K", False),
    ("delta_rule", None, True),
    ("gated_delta_rule", 1, True),
    ("kda", "K", True),
]
PARTS = ("q", "k", "v", "log_decay", "beta", "state")


def make(
    rng: np.random.Generator,
    gate: Any,
    erase: bool,
    *,
    N: int = 1,
    HV: int = 2,
    R: int = 10,
    K: int = 3,
    V: int = 4,
    strength: float = 1.0,
    initial: bool = True,
) -> Problem:
    q = rng.standard_normal((N, HV, R, K))
    k = rng.standard_normal((N, HV, R, K)) / np.sqrt(K)
    v = rng.standard_normal((N, HV, R, V))
    g = None
    if gate is not None:
        width = K if gate == "K" else gate
        g = -strength * rng.uniform(0.05, 1.0, (N, HV, R, width))
    beta = rng.uniform(0.2, 1.0, (N, HV, R, 1)) if erase else None
    S = rng.standard_normal((N, HV, K, V)) if initial else np.zeros((N, HV, K, V))
    return Problem(XP, q, k, v, g, beta, S, erase)


def loss(p: Problem, C: int, one_chunk: bool, w_o: Any, w_s: Any) -> float:
    o, S = chunk(p, C, one_chunk=one_chunk)
    return float(np.sum(o * w_o) + np.sum(S * w_s))


def check_fd(rng: np.random.Generator, p: Problem, C: int, one_chunk: bool = False) -> dict:
    """Compare each part's gradient with a central difference along a random direction
    (zero at ``-inf`` gates); returns the gradients."""
    w_o, w_s = rng.standard_normal(p.v.shape), rng.standard_normal(p.state.shape)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        g = chunk_vjp(p, w_o, w_s, C, one_chunk=one_chunk)
    for name in PARTS:
        x = getattr(p, name)
        if x is None:
            assert g[name] is None, name
            continue
        assert g[name].shape == x.shape, name
        assert np.all(np.isfinite(g[name])), name
        d = rng.standard_normal(x.shape)
        if name == "log_decay":
            d = np.where(np.isneginf(x), 0.0, d)
        h = 1e-6 * max(1.0, float(np.max(np.abs(np.where(np.isfinite(x), x, 0.0)))))
        plus = Problem(**{**vars(p), name: x + h * d})
        minus = Problem(**{**vars(p), name: x - h * d})
        fd = (loss(plus, C, one_chunk, w_o, w_s) - loss(minus, C, one_chunk, w_o, w_s)) / (2 * h)
        exact = float(np.sum(g[name] * d))
        assert exact == pytest.approx(fd, rel=1e-6, abs=1e-7), name
    return g


def assert_equal_to_recurrent(p: Problem, g: dict, w_o: Any, w_s: Any, C: int) -> None:
    r = recurrent_vjp(p, w_o, w_s, C)
    for name in PARTS:
        if g[name] is None:
            assert r[name] is None, name
            continue
        scale = max(1.0, float(np.max(np.abs(r[name]))))
        assert float(np.max(np.abs(g[name] - r[name]))) <= 1e-10 * scale, name


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize(
    "C, one_chunk, initial",
    [(5, False, True), (4, False, False), (3, True, True)],
    ids=["divides", "ragged-zero-state", "one-chunk"],
)
def test_finite_differences(rule: Any, C: int, one_chunk: bool, initial: bool) -> None:
    _, gate, erase = rule
    rng = np.random.default_rng(zlib.crc32(f"{rule[0]} {C} {one_chunk}".encode()))
    check_fd(rng, make(rng, gate, erase, initial=initial), C, one_chunk)


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_chunks_longer_than_a_sub_block(rule: Any) -> None:
    # 37 steps in chunks of 20: the per-key blocks left of the diagonal, the solve's blocks,
    # and the UT inverse (K + V > C) of chunks of 6.
    _, gate, erase = rule
    rng = np.random.default_rng(7)
    p = make(rng, gate, erase, R=37, K=4, V=5)
    check_fd(rng, p, 20)
    w_o, w_s = rng.standard_normal(p.v.shape), rng.standard_normal(p.state.shape)
    for C, one in ((20, False), (6, False), (1, True)):
        assert_equal_to_recurrent(p, chunk_vjp(p, w_o, w_s, C, one_chunk=one), w_o, w_s, C)


@pytest.mark.parametrize("rule", [r for r in RULES if r[1] is not None], ids=lambda r: r[0])
def test_zero_gates(rule: Any) -> None:
    _, gate, erase = rule
    rng = np.random.default_rng(3)
    p = make(rng, gate, erase, R=11)
    p.log_decay[0, 0, 2:5] = 0.0  # whole rows
    p.log_decay[0, 1, ::3, :1] = 0.0  # single entries
    p.log_decay[0, 1, -1] = 0.0
    for C, one in ((4, False), (11, True)):
        check_fd(rng, p, C, one)


@pytest.mark.parametrize("rule", [r for r in RULES if r[1] is not None], ids=lambda r: r[0])
def test_reset_gates(rule: Any) -> None:
    _, gate, erase = rule
    rng = np.random.default_rng(5)
    p = make(rng, gate, erase, R=13)
    p.log_decay[0, 0, 4] = -np.inf  # a whole row: every channel
    p.log_decay[0, 1, 9, :1] = -np.inf  # one channel (the whole gate when per head)
    p.log_decay[0, 1, 0] = -np.inf  # at a chunk's first row
    reset = np.isneginf(p.log_decay)
    w_o, w_s = rng.standard_normal(p.v.shape), rng.standard_normal(p.state.shape)
    for C, one in ((4, False), (5, False), (13, True)):
        g = check_fd(rng, p, C, one)
        assert np.all(g["log_decay"][reset] == 0.0)
        assert_equal_to_recurrent(p, chunk_vjp(p, w_o, w_s, C, one_chunk=one), w_o, w_s, C)


@pytest.mark.parametrize("rule", [r for r in RULES if r[1] is not None], ids=lambda r: r[0])
def test_strong_decays(rule: Any) -> None:
    # Up to -40 a step: the cumulative decay inside a chunk of 20 reaches about -800.
    _, gate, erase = rule
    rng = np.random.default_rng(11)
    p = make(rng, gate, erase, R=23, strength=40.0)
    w_o, w_s = rng.standard_normal(p.v.shape), rng.standard_normal(p.state.shape)
    for C, one in ((20, False), (7, False), (1, True)):
        check_fd(rng, p, C, one)
        assert_equal_to_recurrent(p, chunk_vjp(p, w_o, w_s, C, one_chunk=one), w_o, w_s, C)


def test_equal_to_recurrent_vjp_on_random_cases() -> None:
    rng = np.random.default_rng(13)
    for trial in range(12):
        _, gate, erase = RULES[trial % len(RULES)]
        R = int(rng.integers(1, 30))
        p = make(rng, gate, erase, N=2, R=R, K=int(rng.integers(1, 6)), V=int(rng.integers(1, 6)))
        if gate is not None and trial % 4 == 1:
            p.log_decay[rng.uniform(size=p.log_decay.shape) < 0.1] = -np.inf
        w_o, w_s = rng.standard_normal(p.v.shape), rng.standard_normal(p.state.shape)
        C = int(rng.integers(1, 25))
        for one in (False, True):
            assert_equal_to_recurrent(p, chunk_vjp(p, w_o, w_s, C, one_chunk=one), w_o, w_s, C)


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_empty_sequence(rule: Any) -> None:
    _, gate, erase = rule
    rng = np.random.default_rng(17)
    p = make(rng, gate, erase, R=0)
    w_s = rng.standard_normal(p.state.shape)
    g = chunk_vjp(p, np.zeros(p.v.shape), w_s, 4)
    np.testing.assert_array_equal(g["state"], w_s)
    for name in ("q", "k", "v", "log_decay", "beta"):
        x = getattr(p, name)
        assert (g[name] is None) if x is None else (g[name].shape == x.shape)


def test_hebbian_with_a_beta_has_zero_beta_gradient() -> None:
    rng = np.random.default_rng(19)
    p = make(rng, 1, False)
    p = Problem(**{**vars(p), "beta": rng.uniform(0.2, 1.0, (1, 2, 10, 1))})
    g = chunk_vjp(p, rng.standard_normal(p.v.shape), rng.standard_normal(p.state.shape), 4)
    np.testing.assert_array_equal(g["beta"], 0.0)


@pytest.mark.parametrize("rule", [RULES[2], RULES[4], RULES[5]], ids=lambda r: r[0])
def test_array_api_strict(rule: Any) -> None:
    xps = pytest.importorskip("array_api_strict")
    _, gate, erase = rule
    rng = np.random.default_rng(23)
    p = make(rng, gate, erase, R=21, K=3, V=4)
    p.log_decay[0, 1, 6] = -np.inf
    w_o, w_s = rng.standard_normal(p.v.shape), rng.standard_normal(p.state.shape)
    fields = {n: (None if x is None else xps.asarray(x)) for n, x in vars(p).items() if n in PARTS}
    ps = Problem(xps, **fields, erase=erase)
    for C, one in ((4, False), (18, False), (1, True)):
        ref = chunk_vjp(p, w_o, w_s, C, one_chunk=one)
        got = chunk_vjp(ps, xps.asarray(w_o), xps.asarray(w_s), C, one_chunk=one)
        for name in PARTS:
            if ref[name] is None:
                assert got[name] is None
                continue
            np.testing.assert_allclose(np.asarray(got[name]), ref[name], rtol=0, atol=1e-12)
