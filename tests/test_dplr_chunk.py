"""The DPLR chunk form against the step-by-step definition, at the Problem level.

``S_t = Diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``, ``o_t = S_t^T q_t``:
float64 to 1e-12 and float32 to 1e-5 (relative RMS against the float64 recurrent form) over
chunk sizes and lengths that cut chunks every way, ``gk`` None (iplr), ``gk = -inf`` entries
and whole rows (the rank-1 term still reads the old state), strong decays (e^-12, e^-50 per
step in float32), non-finite inputs (causal, and the same non-finite outputs as the recurrent
form), array-api-strict, and the golden2 dplr / iplr / rwkv7 cases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastweights.rules.dplr._layout import Problem
from fastweights.rules.dplr.chunk import chunk
from fastweights.rules.dplr.recurrent import recurrent
from fastweights.testing import relative_rms, to_numpy

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

GOLDEN2 = Path("/work/shared/golden2")
CHUNK_SIZES = (1, 2, 15, 16, 17, 64)
LENGTHS = (1, 2, 33, 100)
GATES = ("none", "mild", "strong", "reset", "head")


def make(
    T: int,
    gate: str,
    *,
    dtype: Any = np.float64,
    N: int = 1,
    HV: int = 2,
    K: int = 8,
    V: int = 12,
    seed: int = 0,
    xp: Any = np,
) -> Problem:
    """A stable DPLR problem: ``a = -c``, ``b = beta d`` with unit ``c, d``, ``c . d ~ 0.9``
    (the golden cases' construction; independent random ``a, b`` make the state grow).

    ``gate``: ``none`` (iplr), ``mild`` (log-decay in [-1, 0]), ``strong`` ([-12, 0]),
    ``reset`` (mild with 5% ``-inf`` entries and a whole row of them at T // 2), ``head``
    (one log-decay per head broadcast over K, with a reset row at T // 2: the per-head path).
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((N, HV, T, K)) / np.sqrt(K)
    k = rng.standard_normal((N, HV, T, K)) / np.sqrt(K)
    v = rng.standard_normal((N, HV, T, V))
    c = rng.standard_normal((N, HV, T, K))
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    d = c + 0.3 * rng.standard_normal((N, HV, T, K)) / np.sqrt(K)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    beta = rng.uniform(0.2, 1.0, (N, HV, T, 1))
    gk = None
    if gate != "none":
        gk = -rng.uniform(0.0, 12.0 if gate == "strong" else 1.0, (N, HV, T, K))
        gk[rng.uniform(size=gk.shape) < 0.1] = 0.0
        if gate == "head":
            gk = np.repeat(gk[..., :1], K, axis=-1)
        if gate in ("reset", "head"):
            if gate == "reset":
                gk[rng.uniform(size=gk.shape) < 0.05] = -np.inf
            gk[:, :, T // 2, :] = -np.inf
    state = 0.3 * rng.standard_normal((N, HV, K, V))

    def cast(x: Any) -> Any:
        return None if x is None else xp.asarray(x.astype(dtype))

    return Problem(xp, *(cast(x) for x in (q, k, v, -c, beta * d, gk, state)))


def as64(p: Problem) -> Problem:
    """The same problem in float64 NumPy (the oracle's inputs)."""

    def cast(x: Any) -> Any:
        return None if x is None else to_numpy(x).astype(np.float64)

    return Problem(np, *(cast(x) for x in (p.q, p.k, p.v, p.a, p.b, p.log_decay, p.state)))


def err(got: tuple[Any, Any], ref: tuple[Any, Any]) -> float:
    return max(relative_rms(to_numpy(g), r) for g, r in zip(got, ref, strict=True))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", LENGTHS)
def test_float64_matches_recurrent(T: int, gate: str) -> None:
    p = make(T, gate)
    ref = recurrent(p)
    assert all(np.isfinite(x).all() for x in ref)
    for C in CHUNK_SIZES:
        assert err(chunk(p, C), ref) <= 1e-12, C


@pytest.mark.parametrize("gate", GATES)
def test_float32_matches_recurrent(gate: str) -> None:
    p = make(100, gate, dtype=np.float32, K=16, V=8)
    ref = recurrent(as64(p))
    for C in CHUNK_SIZES:
        o, S = chunk(p, C)
        assert o.dtype == np.float32 and S.dtype == np.float32
        assert err((o, S), ref) <= 1e-5, C


@pytest.mark.parametrize("strength", [12.0, 50.0])
def test_strong_decays_float32(strength: float) -> None:
    """Log-decays down to -12 and -50 per step and per channel: finite and accurate."""
    p = make(100, "mild", dtype=np.float32, K=16, V=8, seed=1)
    p.log_decay = p.log_decay * np.float32(strength)  # in [-strength, 0]
    p.log_decay[..., ::7, :] = -strength  # every channel at the bound on some rows
    ref = recurrent(as64(p))
    for C in (16, 17, 64):
        o, S = chunk(p, C)
        assert np.isfinite(o).all() and np.isfinite(S).all()
        assert err((o, S), ref) <= 1e-5, C


def test_whole_reset_row_keeps_the_rank_one_read() -> None:
    """``gk = -inf`` on every channel zeroes the decayed state, not the state: the rank-1 term
    still reads ``S_{t-1}`` (and a chunk boundary at the reset changes nothing)."""
    p = make(40, "mild", K=6, V=5, seed=2)
    p.log_decay[..., 1, :] = -np.inf
    p.log_decay[..., 16, :] = -np.inf
    p.log_decay[..., 20, :] = -np.inf
    p.log_decay[..., 21, :] = -np.inf
    ref = recurrent(p)
    assert np.isfinite(ref[0]).all()
    for C in (1, 4, 16, 17, 40):
        assert err(chunk(p, C), ref) <= 1e-12, C
    # The state before the reset still matters after it (the rank-1 path across the reset).
    p.state = 2.0 * p.state
    after = chunk(p, 16)[0][..., 1:4, :]
    assert relative_rms(after, ref[0][..., 1:4, :]) > 1e-2


def test_padding_and_shapes() -> None:
    p = make(33, "reset", N=2, HV=3, K=5, V=7)
    for C in (1, 8, 32, 64, 1000):
        o, S = chunk(p, C)
        assert o.shape == (2, 3, 33, 7) and S.shape == (2, 3, 5, 7)
    p0 = make(0, "mild")
    o, S = chunk(p0, 16)
    assert o.shape == (1, 2, 0, 12) and np.array_equal(S, p0.state)
    with pytest.raises(ValueError):
        chunk(p, 0)


def test_scores_in_groups_of_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PAIR_BUDGET the per-channel scores go a chunk at a time: the same results, and a
    NaN still reaches no earlier output."""
    from fastweights.rules.dplr import chunk as module

    monkeypatch.setattr(module, "PAIR_BUDGET", 1)
    for gate in ("mild", "reset"):
        p = make(100, gate)
        ref = recurrent(p)
        for C in (1, 16, 17):
            assert err(chunk(p, C), ref) <= 1e-12, (gate, C)
    clean = chunk(p, 17)[0]
    p.v[0, 1, 40, 2] = np.nan
    o = chunk(p, 17)[0]
    np.testing.assert_array_equal(o[:, :, :40], clean[:, :, :40])
    assert np.array_equal(np.isfinite(o), np.isfinite(recurrent(p)[0]))


class _NoExp:
    """NumPy's namespace without exponentials."""

    def __init__(self) -> None:
        from array_api_compat import numpy as xp

        self._xp = xp

    def __getattr__(self, name: str) -> Any:
        if name in ("exp", "expm1", "pow"):
            raise AssertionError(f"iplr took xp.{name}")
        return getattr(self._xp, name)


def test_iplr_takes_no_exponentials() -> None:
    p = make(33, "none")
    ref = recurrent(p)
    p.xp = _NoExp()
    assert err(chunk(p, 16), ref) <= 1e-12


POISON = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


@settings(max_examples=min(settings.default.max_examples, 12))
@given(
    name=st.sampled_from(["q", "k", "v", "a", "b", "log_decay", "state"]),
    value=st.sampled_from(sorted(POISON)),
    t=st.integers(0, 39),
    col=st.integers(0, 5),
    C=st.sampled_from([1, 3, 16, 17, 64]),
    gate=st.sampled_from(["none", "mild", "reset", "head"]),
)
def test_nonfinite_inputs_are_causal(
    name: str, value: str, t: int, col: int, C: int, gate: str
) -> None:
    """A NaN or Inf at step t changes no output before t (beyond rounding), and leaves the same
    outputs non-finite as in the recurrent form (its rank-1 read spreads them along the columns)."""
    if gate == "none" and name == "log_decay":
        name = "k"
    if name == "log_decay" and value == "-inf":
        value = "nan"  # -inf is a valid log-decay (tested above)
    p = make(40, gate, K=6, V=6, seed=t)
    clean = chunk(p, C)[0]
    x = getattr(p, name).copy()
    if name == "state":
        x[0, 1, col, col] = POISON[value]
        t = 0
    else:
        x[0, 1, t, col] = POISON[value]
    setattr(p, name, x)
    o = chunk(p, C)[0]
    # rtol as test_causal's: a gate that is no longer equal across K (a NaN in one channel)
    # moves every head from the per-head path to the per-channel one, a rounding change.
    np.testing.assert_allclose(o[:, :, :t], clean[:, :, :t], rtol=1e-12, atol=0)
    np.testing.assert_allclose(o[:, 0], clean[:, 0], rtol=1e-12, atol=0)  # the other head
    assert np.array_equal(np.isfinite(o), np.isfinite(recurrent(p)[0]))


def test_array_api_strict() -> None:
    xp = pytest.importorskip("array_api_strict")
    for gate in ("none", "reset", "head"):
        p = make(33, gate, xp=xp)
        ref = recurrent(as64(p))
        for C in (1, 16, 17):
            o, S = chunk(p, C)
            assert type(o).__module__.startswith("array_api_strict")
            assert err((o, S), ref) <= 1e-12, (gate, C)


# golden2: fla's naive code in float64 ([B, T, H, K] layout), both forms to 1e-12.


def _golden_cases() -> list[str]:
    if not GOLDEN2.is_dir():
        return []
    return sorted(
        f.stem for f in GOLDEN2.glob("*.npz") if f.stem.split("_")[0] in ("dplr", "iplr", "rwkv7")
    )


def golden_problems(name: str) -> tuple[list[Problem], dict[str, np.ndarray]]:
    """One Problem per sequence (as ``_layout.prepare`` pads them: each runs alone)."""
    f = np.load(GOLDEN2 / f"{name}.npz")
    meta = json.loads(str(f["meta"]))
    q, k, v = f["q"], f["k"], f["v"]
    if meta["op"] == "rwkv7":
        a, b, gk = -f["kk"], f["kk"] * f["a"], f["w"]
    else:
        a, b = f["a"], f["b"]
        gk = f["gk"] if meta["op"] == "dplr" else None
    K, H, HV = q.shape[-1], q.shape[2], v.shape[2]
    q = q * meta["kwargs"].get("scale", K**-0.5)
    q, k = np.repeat(q, HV // H, axis=2), np.repeat(k, HV // H, axis=2)
    cu = f["cu_seqlens"] if "cu_seqlens" in f.files else None
    N = len(cu) - 1 if cu is not None else q.shape[0]
    state = f["initial_state"] if "initial_state" in f.files else None
    if state is None:
        state = np.zeros((N, HV, K, v.shape[-1]))

    def heads(x: Any, i: int) -> Any:
        if x is None:
            return None
        x = x[i : i + 1] if cu is None else x[:, cu[i] : cu[i + 1]]
        return np.ascontiguousarray(np.transpose(x, (0, 2, 1, 3)))

    problems = [
        Problem(np, *(heads(x, i) for x in (q, k, v, a, b, gk)), state[i : i + 1]) for i in range(N)
    ]
    return problems, {"o": f["o"], "final_state": f["final_state"]}


def _run_golden(problems: list[Problem], form: Any) -> tuple[np.ndarray, np.ndarray]:
    outs, states = zip(*(form(p) for p in problems), strict=True)
    o = np.concatenate([np.transpose(x, (0, 2, 1, 3)) for x in outs], axis=1)
    return o, np.concatenate(states, axis=0)


@pytest.mark.parametrize("name", _golden_cases())
def test_golden2(name: str) -> None:
    problems, want = golden_problems(name)
    forms = {"recurrent": recurrent}
    for C in (1, 16, 17, 64):
        forms[f"chunk{C}"] = lambda p, C=C: chunk(p, C)
    for label, form in forms.items():
        o, S = _run_golden(problems, form)
        o = o.reshape(want["o"].shape)
        assert relative_rms(o, want["o"]) <= 1e-12, label
        assert relative_rms(S, want["final_state"]) <= 1e-12, label
