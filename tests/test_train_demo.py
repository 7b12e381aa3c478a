"""``python -m fastweights train-demo`` (fastweights._train_demo): the quick run writes its
JSON with both settings, and the model's hand-written gradient equals finite differences."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fastweights import _train_demo as td
from fastweights.__main__ import main


def test_quick_run_writes_both_settings(tmp_path, capsys):
    assert main(["train-demo", "--quick", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "train_demo.json").read_text())
    runs = report["runs"]
    assert sorted((r["beta_max"], r["seed"]) for r in runs) == [
        (1.0, 0),
        (1.0, 1),
        (2.0, 0),
        (2.0, 1),
    ]
    L = report["config"]["length"]
    for r in runs:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["train_accuracy"] <= 1.0
        assert len(r["losses"]) == report["config"]["steps"]
        assert len(r["by_length"]) == 4 * L
        assert r["curve"][-1] == [report["config"]["steps"], r["test_accuracy"]]
        assert 0.0 < r["beta_zero"] < r["beta_max"] and 0.0 < r["beta_one"] < r["beta_max"]
    assert isinstance(report["claim_reproduced"], bool)
    assert "beta in (0, 2): test accuracy per seed" in out
    assert "beta in (0, 1), seed 1 [" in err  # the progress bar
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in out
    else:
        assert (tmp_path / "train_demo.png").stat().st_size > 0


def test_plot_is_optional(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    result = td.run_train_demo(seeds=[0], steps=2, out=str(tmp_path), quick=True, progress=False)
    assert [r.beta_max for r in result.runs] == [2.0, 1.0]
    assert "no plot: matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "train_demo.json").exists() and not (tmp_path / "train_demo.png").exists()


@pytest.mark.parametrize("option", [["--steps", "0"], ["--length", "0"], ["--hidden", "-1"]])
def test_bad_options(option, capsys):
    assert main(["train-demo", "--quick", *option]) == 2
    assert "train-demo: --" in capsys.readouterr().err


@pytest.mark.parametrize("hidden", [0, 3])
@pytest.mark.parametrize("beta_max", [2.0, 1.0])
def test_gradient_equals_finite_differences(hidden, beta_max):
    config = td.Config(heads=2, dim=3, hidden=hidden)
    rng = np.random.default_rng(1)
    params = td.init_params(rng, config)
    # move every parameter off its initial value (zeros would hide terms of the gradient)
    params = {n: p + 0.3 * rng.standard_normal(p.shape) for n, p in params.items()}
    bits, parity = td.parity_batch(rng, 3, 5)
    _, grads, _ = td.loss_and_grads(params, bits, parity, beta_max, smoothing=0.1)
    assert sorted(grads) == sorted(params)
    eps = 1e-6
    for name, p in params.items():
        assert grads[name].shape == p.shape
        direction = rng.standard_normal(p.shape)
        up = td.loss_and_grads({**params, name: p + eps * direction}, bits, parity, beta_max, 0.1)
        down = td.loss_and_grads({**params, name: p - eps * direction}, bits, parity, beta_max, 0.1)
        numeric = (up[0] - down[0]) / (2 * eps)
        analytic = float(np.sum(grads[name] * direction))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


def test_adam_minimises_a_quadratic():
    params = {"x": np.array([3.0, -2.0])}
    opt = td.Adam(params, lr=0.1, clip=10.0)
    for _ in range(300):
        params = opt.step(params, {"x": 2 * params["x"]})
    assert np.abs(params["x"]).max() < 1e-2
