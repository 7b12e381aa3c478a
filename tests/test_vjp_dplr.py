"""The DPLR reverse sweeps (rules/dplr/recurrent_vjp.py, chunk_vjp.py) at the Problem level.

Central finite differences (float64) of the recurrent and chunk forwards, all perturbations of
a case run at once as one batch of sequences, against both sweeps: with and without decay,
exact-zero gates, ``-inf`` gates (gradient exactly 0 there, every other entry still matches),
a per-head gate, strong decays, ``R`` not a multiple of ``C``. The two sweeps agree to 1e-10
(relative to each gradient's largest entry) over chunk sizes, lengths and gates, including
decays far beyond ``exp``'s range inside a chunk (no NaN); array-api-strict runs both; and
``rwkv7_grads`` is the adjoint of ``to_dplr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fastweights.rules.dplr._layout import Problem
from fastweights.rules.dplr.chunk import chunk
from fastweights.rules.dplr.chunk_vjp import chunk_vjp
from fastweights.rules.dplr.recurrent import recurrent
from fastweights.rules.dplr.recurrent_vjp import recurrent_vjp
from fastweights.rules.dplr.rwkv7 import rwkv7_grads, to_dplr
from fastweights.testing import to_numpy

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NAMES = ("q", "k", "v", "a", "b", "log_decay", "state")


def make(
    R: int,
    gate: str,
    *,
    N: int = 1,
    HV: int = 2,
    K: int = 3,
    V: int = 2,
    state: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The arrays of a stable DPLR problem (``a = -c``, ``b = beta d``, ``c . d ~ 0.9``).

    ``gate``: ``none`` (iplr), ``mild`` (log-decay in [-1, 0], 10% exact zeros), ``strong``
    ([-12, 0]), ``extreme`` ([-300, 0]: far beyond ``exp``'s range over a chunk), ``reset``
    (mild with ``-inf`` entries and a whole ``-inf`` row), ``head`` (one log-decay per head
    broadcast over K, with a ``-inf`` row).
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((N, HV, R, K)) / np.sqrt(K)
    k = rng.standard_normal((N, HV, R, K)) / np.sqrt(K)
    v = rng.standard_normal((N, HV, R, V))
    c = rng.standard_normal((N, HV, R, K))
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    d = c + 0.3 * rng.standard_normal((N, HV, R, K)) / np.sqrt(K)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    beta = rng.uniform(0.2, 1.0, (N, HV, R, 1))
    gk = None
    if gate != "none":
        scale = {"strong": 12.0, "extreme": 300.0}.get(gate, 1.0)
        gk = -rng.uniform(0.0, scale, (N, HV, R, K))
        gk[rng.uniform(size=gk.shape) < 0.1] = 0.0
        if gate == "head":
            gk = np.repeat(gk[..., :1], K, axis=-1)
        if gate in ("reset", "head") and R > 1:
            if gate == "reset":
                gk[0, 0, 1, 0] = -np.inf
                gk[rng.uniform(size=gk.shape) < 0.05] = -np.inf
            gk[:, -1, R // 2, :] = -np.inf
    S = 0.3 * rng.standard_normal((N, HV, K, V)) if state else np.zeros((N, HV, K, V))
    return dict(q=q, k=k, v=v, a=-c, b=beta * d, log_decay=gk, state=S)


def cotangents(arrays: dict[str, Any], seed: int = 1) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(arrays["v"].shape), rng.standard_normal(arrays["state"].shape)


def problem(arrays: dict[str, Any], xp: Any = np) -> Problem:
    return Problem(xp, **{n: None if x is None else xp.asarray(x) for n, x in arrays.items()})


def finite_differences(
    forward: Callable[[Problem], tuple[Any, Any]],
    arrays: dict[str, Any],
    do: Any,
    dstate: Any,
    eps: float = 1e-6,
) -> dict[str, Any]:
    """Central differences of ``sum(o * do) + sum(S * dstate)`` for every finite entry of every
    array (``N == 1``), all perturbations as one batch of ``2 P`` sequences."""
    entries = [
        (n, i)
        for n, x in arrays.items()
        if x is not None
        for i in np.ndindex(x.shape)
        if np.isfinite(x[i])
    ]
    batch: dict[str, Any] = {}
    for n, x in arrays.items():
        if x is None:
            batch[n] = None
            continue
        b = np.repeat(x, 2 * len(entries), axis=0)
        for j, (m, i) in enumerate(entries):
            if m == n:
                up, down = (2 * j, *i[1:]), (2 * j + 1, *i[1:])
                b[up] += eps
                b[down] -= eps
        batch[n] = b
    o, S = forward(problem(batch))
    loss = np.sum(o * do, axis=(1, 2, 3)) + np.sum(S * dstate, axis=(1, 2, 3))
    grads = {n: np.zeros_like(x) for n, x in arrays.items() if x is not None}
    for j, (n, i) in enumerate(entries):
        grads[n][i] = (loss[2 * j] - loss[2 * j + 1]) / (2 * eps)
    return grads


def close(got: dict[str, Any], want: dict[str, Any], tol: float) -> None:
    for n, w in want.items():
        if w is None:
            assert got[n] is None, n
            continue
        g = to_numpy(got[n])
        assert g.shape == w.shape, (n, g.shape, w.shape)
        assert np.all(np.isfinite(g)), n
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        err = float(np.max(np.abs(g - w))) if w.size else 0.0
        assert err <= tol * scale, (n, err, scale)


def sweep(form: str, p: Problem, do: Any, dstate: Any, C: int) -> dict[str, Any]:
    if form == "recurrent":
        return recurrent_vjp(p, do, dstate, C)
    return chunk_vjp(p, do, dstate, C)


@pytest.mark.parametrize("gate", ("none", "mild", "strong", "extreme", "reset", "head"))
@pytest.mark.parametrize("form", ("recurrent", "chunk"))
def test_finite_differences(form: str, gate: str) -> None:
    arrays = make(7, gate)
    do, dstate = cotangents(arrays)
    fd = finite_differences(
        recurrent if form == "recurrent" else lambda p: chunk(p, 3), arrays, do, dstate
    )
    p = problem(arrays)
    for C in (3, 16):  # R = 7: chunks cut short, and one chunk longer than the sequence
        g = sweep(form, p, do, dstate, C)
        assert set(g) == set(NAMES)
        close(g, {**fd, "log_decay": fd.get("log_decay")}, 1e-7)
        if arrays["log_decay"] is not None:
            reset = arrays["log_decay"] == -np.inf
            assert np.all(g["log_decay"][reset] == 0.0)


@pytest.mark.parametrize("form", ("recurrent", "chunk"))
def test_finite_differences_zero_state_two_sequences(form: str) -> None:
    arrays = make(5, "reset", N=2, state=False, seed=3)
    do, dstate = cotangents(arrays, seed=4)
    want: dict[str, list[Any]] = {n: [] for n in NAMES}
    for i in range(2):
        one = {n: None if x is None else x[i : i + 1] for n, x in arrays.items()}
        fd = finite_differences(recurrent, one, do[i : i + 1], dstate[i : i + 1])
        for n in NAMES:
            want[n].append(fd[n])
    g = sweep(form, problem(arrays), do, dstate, 2)
    close(g, {n: np.concatenate(x) for n, x in want.items()}, 1e-7)


def both(arrays: dict[str, Any], C: int, xp: Any = np) -> tuple[dict[str, Any], dict[str, Any]]:
    do, dstate = cotangents(arrays)
    p = problem(arrays, xp)
    do, dstate = xp.asarray(do), xp.asarray(dstate)
    return recurrent_vjp(p, do, dstate, C), chunk_vjp(p, do, dstate, C)


@pytest.mark.parametrize("gate", ("none", "mild", "strong", "extreme", "reset", "head"))
@pytest.mark.parametrize("R", (1, 33))
def test_recurrent_equals_chunk(R: int, gate: str) -> None:
    # K + V = 14: chunks of 16, 17 take the inverse path, 1 and 2 the solves.
    arrays = make(R, gate, K=8, V=6, seed=R)
    for C in (1, 2, 16, 17, 40):  # 40: three sub-blocks of the chunk's scores at R = 33
        rec, chk = both(arrays, C)
        close(chk, {n: rec[n] for n in NAMES}, 1e-10)
        assert all(x is None or np.all(np.isfinite(x)) for x in rec.values())


def test_chunks_in_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-channel scores go in groups of chunks beyond PAIR_BUDGET: one chunk per group."""
    import fastweights.rules.dplr.chunk as forward
    import fastweights.rules.dplr.chunk_vjp as backward

    arrays = make(40, "reset", K=4, V=3, seed=7)
    want = both(arrays, 8)[0]
    monkeypatch.setattr(forward, "PAIR_BUDGET", 1)
    monkeypatch.setattr(backward, "PAIR_BUDGET", 1)
    close(both(arrays, 8)[1], want, 1e-10)


def test_empty_and_no_parallel_form() -> None:
    arrays = make(0, "mild")
    for g in both(arrays, 4):
        for n in ("q", "k", "v", "a", "b", "log_decay"):
            assert g[n].shape == arrays[n].shape
        np.testing.assert_array_equal(g["state"], cotangents(arrays)[1])
    do, dstate = cotangents(make(3, "mild"))
    with pytest.raises(ValueError, match="parallel"):
        chunk_vjp(problem(make(3, "mild")), do, dstate, 4, one_chunk=True)


def test_array_api_strict() -> None:
    xp = pytest.importorskip("array_api_strict")
    for gate in ("none", "reset", "head"):
        arrays = make(9, gate, K=4, V=3)
        want = both(arrays, 4)[0]
        for g in both(arrays, 4, xp):
            assert type(g["q"]).__module__.startswith("array_api_strict")
            close({n: None if x is None else to_numpy(x) for n, x in g.items()}, want, 1e-12)


def test_rwkv7_grads_is_the_adjoint_of_to_dplr() -> None:
    rng = np.random.default_rng(5)
    shape = (1, 3, 2, 4)
    arrays = {n: rng.standard_normal(shape) for n in ("q", "k", "v", "w", "kk", "a")}
    parent = {n: rng.standard_normal(shape) for n in ("q", "k", "v", "a", "b", "gk")}
    parent["initial_state"] = rng.standard_normal((1, 2, 4, 4))
    got = rwkv7_grads(np, arrays, parent)
    assert set(got) == {"q", "k", "v", "w", "kk", "a", "initial_state"}
    for n in ("q", "k", "v", "initial_state"):
        assert got[n] is parent[n]

    def loss(x: dict[str, Any]) -> float:
        mapped = to_dplr(np, x)
        return float(sum(np.sum(mapped[n] * parent[n]) for n in ("a", "b", "gk")))

    eps = 1e-6
    for n in ("w", "kk", "a"):
        fd = np.zeros(shape)
        for i in np.ndindex(shape):
            up, down = dict(arrays), dict(arrays)
            up[n], down[n] = arrays[n].copy(), arrays[n].copy()
            up[n][i] += eps
            down[n][i] -= eps
            fd[i] = (loss(up) - loss(down)) / (2 * eps)
        np.testing.assert_allclose(got[n], fd, rtol=1e-7, atol=1e-8)
