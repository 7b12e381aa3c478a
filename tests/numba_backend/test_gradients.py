"""The numba backend's gradient kernels (backends/numba/gradients.py, issue 13 item 2).

The kernels' sweeps equal the reference sweeps (``rules/delta/chunk_vjp.py``) on small random
problems of every rule configuration, and ``fastweights.vjp(..., backend="numba")`` reproduces
the golden2 ``vjp_*`` cases in every form. Two dtype specialisations of one kernel (cached on
disk by ``_jit``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")

import fastweights
from fastweights.rules.delta._layout import Problem
from fastweights.rules.delta.chunk_vjp import chunk_vjp as reference_chunk_vjp
from fastweights.rules.delta.recurrent_vjp import recurrent_vjp as reference_recurrent_vjp
from fastweights.testing import relative_rms

gradients = pytest.importorskip("fastweights.backends.numba.gradients")

TOL = {np.float64: 1e-10, np.float32: 2e-4}


def _problem(
    rng: np.random.Generator,
    dt: Any,
    *,
    gate: str | None,
    erase: bool,
    R: int = 13,
    reset: bool = False,
    N: int = 2,
    HV: int = 2,
    K: int = 5,
    V: int = 4,
) -> Problem:
    def f(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dt)

    k = f(N, HV, R, K)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    log_decay = None
    if gate is not None:
        width = 1 if gate == "scalar" else K
        log_decay = -rng.uniform(0.0, 1.5, (N, HV, R, width)).astype(dt)
        if reset:
            log_decay[0, :, 5, :] = -np.inf
            log_decay[1, 0, 0, :] = -np.inf
    beta = rng.uniform(0.1, 1.9, (N, HV, R, 1)).astype(dt) if erase else None
    return Problem(
        xp=np,
        q=f(N, HV, R, K),
        k=k,
        v=f(N, HV, R, V),
        log_decay=log_decay,
        beta=beta,
        state=f(N, HV, K, V),
        erase=erase,
    )


def _compare(want: dict[str, Any], got: dict[str, Any], tol: float) -> None:
    assert sorted(want) == sorted(got)
    for name, w in want.items():
        if w is None:
            assert got[name] is None, name
            continue
        g = np.asarray(got[name])
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.all(np.isfinite(g)), name
        err = relative_rms(g.astype(np.float64), np.asarray(w, np.float64))
        assert err <= tol, f"{name}: {err:.2e} > {tol:g}"


@pytest.mark.parametrize("dt", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("gate", [None, "scalar", "key"])
@pytest.mark.parametrize("erase", [False, True], ids=["hebbian", "delta"])
def test_sweeps_equal_the_reference(dt: Any, gate: str | None, erase: bool) -> None:
    rng = np.random.default_rng(7)
    for R, C, reset, one_chunk in (
        (13, 4, False, False),
        (13, 16, True, False),
        (9, 3, True, True),
    ):
        p = _problem(rng, dt, gate=gate, erase=erase, R=R, reset=reset and gate is not None)
        do = rng.standard_normal(p.v.shape).astype(dt)
        ds = rng.standard_normal(p.state.shape).astype(dt)
        want = reference_chunk_vjp(p, do, ds, C, one_chunk=one_chunk)
        _compare(want, gradients.chunk_vjp(p, do, ds, C, one_chunk=one_chunk), TOL[dt])
        if not one_chunk:
            rec = reference_recurrent_vjp(p, do, ds, C)
            _compare(rec, gradients.recurrent_vjp(p, do, ds, C), TOL[dt])
        if reset and gate is not None:
            g = gradients.chunk_vjp(p, do, ds, C)["log_decay"]
            assert np.all(g[p.log_decay == -np.inf] == 0)


def test_empty_sequence_and_per_value_beta() -> None:
    rng = np.random.default_rng(1)
    p = _problem(rng, np.float64, gate="scalar", erase=True, R=0)
    ds = rng.standard_normal(p.state.shape)
    out = gradients.chunk_vjp(p, np.zeros(p.v.shape), ds, 4)
    np.testing.assert_array_equal(out["state"], ds)
    assert out["q"].shape == p.q.shape
    p = _problem(rng, np.float64, gate=None, erase=True)
    wide = Problem(**{**p.__dict__, "beta": np.ones((*p.v.shape[:-1], 4))})
    assert gradients.rejects(wide.beta) is not None
    with pytest.raises(ValueError, match="per-value"):
        gradients.chunk_vjp(wide, np.zeros(p.v.shape), np.zeros(p.state.shape), 4)


def _golden() -> list[tuple[str, dict[str, Any]]]:
    root = resources.files("fastweights.testing").joinpath("golden2")
    manifest = json.loads(root.joinpath("manifest.json").read_text())
    cases = []
    for entry in manifest:
        if entry.get("kind") != "vjp":
            continue
        with root.joinpath(f"{entry['name']}.npz").open("rb") as fh, np.load(fh) as data:
            cases.append((entry["name"], {n: np.array(data[n]) for n in data.files}))
    return cases


@pytest.mark.parametrize("dt", [np.float64, np.float32], ids=["f64", "f32"])
def test_golden_vjp_through_numba(dt: Any) -> None:
    from fastweights.backends import get_backend

    backend = get_backend("numba")
    checked = 0
    for name, data in _golden():
        meta = json.loads(str(data["meta"]))
        arrays = {n: data[n].astype(dt) if data[n].dtype.kind == "f" else data[n]
                  for n in meta["inputs"]}  # fmt: skip
        w_o, w_s = (data[n].astype(dt) for n in meta["cotangents"])
        per_value = arrays.get("beta") is not None and arrays["beta"].ndim == 4
        for form in ("recurrent",) if per_value else ("recurrent", "chunk"):
            kwargs = dict(meta["kwargs"])
            _, _, pullback = fastweights.vjp(
                meta["op"], **arrays, **kwargs, backend="numba", form=form
            )
            plan = fastweights.plan(getattr(fastweights, meta["op"]), **arrays, **kwargs,
                                    backend="numba", form=form)  # fmt: skip
            assert plan.gradient.startswith("numba") != per_value, (name, plan.gradient)
            grads = pullback(w_o, w_s)
            for g, got in grads.items():
                want = data[f"grad_{g}"]
                err = relative_rms(np.asarray(got, np.float64), want)
                assert err <= TOL[dt], f"{name} {form} {g}: {err:.2e}"
            checked += 1
    assert backend.vjp_rejects is not None
    assert checked == 19  # the per-value beta case has no chunk form
