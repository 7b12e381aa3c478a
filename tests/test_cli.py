"""The command-line entry point: ``python -m fastweights info`` and ``demo``."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from fastweights.__main__ import main
from fastweights._demo import memory_experiments, run_demo, throughput

K = 64


@pytest.fixture(scope="module")
def memory():
    return memory_experiments(K, trials=4, seed=0)


def test_info_lists_versions_and_reference_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out
    assert "array-api-compat" in out
    assert "matplotlib" in out
    assert "reference" in out
    assert "gated_delta_rule" in out


def test_info_reports_absent_optional_packages_without_importing_them(monkeypatch):
    from importlib import metadata

    from fastweights import _cli_info

    real = metadata.version

    def fake(name):
        if name == "jax":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(_cli_info.metadata, "version", fake)
    assert dict(_cli_info.package_versions())["jax"] == "not installed"


def test_hebbian_recall_error_matches_theory_at_capacity(memory):
    at_k = memory.at(K)
    assert at_k["hebbian_error"] == pytest.approx((K - 1) / K, rel=0.3)


def test_hebbian_recall_error_grows_with_load(memory):
    assert np.all(np.diff(memory.hebbian_error) > 0)
    np.testing.assert_allclose(memory.hebbian_error, memory.theory_error, rtol=0.3, atol=0.03)


def test_delta_rule_recalls_better_than_hebbian(memory):
    assert all(d < h for d, h in zip(memory.delta_error, memory.hebbian_error, strict=True))


def test_delta_rule_write_is_exact(memory):
    assert memory.delta_write_error < 1e-10


def test_delta_rule_overwrites_up_to_quarter_capacity(memory):
    assert memory.at(K // 4)["delta_latest"] == 1.0
    assert memory.at(K // 2)["delta_latest"] >= 0.95


def test_hebbian_overwrite_is_a_coin_flip(memory):
    assert np.mean(memory.hebbian_latest) == pytest.approx(0.5, abs=0.1)


def test_memory_experiments_are_reproducible():
    a = memory_experiments(16, [4, 8], trials=2, seed=3)
    b = memory_experiments(16, [4, 8], trials=2, seed=3)
    assert a == b


def test_demo_prints_both_tables(capsys):
    assert main(["demo", "--quick", "--no-plot", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out
    assert "Table 2" in out
    assert "Hebbian" in out
    assert "Widrow-Hoff" in out


def test_demo_writes_plot_or_says_skipped(tmp_path):
    path = tmp_path / "demo.png"
    buf = io.StringIO()
    result = run_demo(quick=True, bench=False, plot=str(path), out=buf)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.plot_path is None
        assert "skipped" in buf.getvalue()
    else:
        assert result.plot_path == str(path)
        assert path.stat().st_size > 0


def test_throughput_times_reference_backend_against_numpy_loop():
    result = throughput(1, 40, 2, 16, repeats=1, backends=["reference", "no-such-backend"])
    names = [t.name for t in result.backends]
    assert names == ["reference"]
    ref = result.backends[0]
    assert ref.best_s > 0 and ref.tokens_per_s > 0
    assert ref.rel_err < 5e-5
    assert result.skipped == (("no-such-backend", "not registered"),)


def test_demo_quick_runs_end_to_end(capsys):
    assert main(["demo", "--quick", "--no-plot", "--size", "1,64,1,16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out
    assert "numpy loop" in out
    assert "backend=reference" in out


@pytest.mark.slow  # the bench CLI's options are tests/test_bench_cli.py's
def test_bench_subcommand_prints_rates(capsys):
    argv = ["--length", "16", "--heads", "1", "--dim", "8", "--ops", "gla", "--repeats", "1"]
    assert main(["bench", *argv, "--backends", "reference"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "reference" in out


@pytest.mark.parametrize("argv", [[], ["demo", "--size", "1,2,3"], ["nope"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_module_runs_as_script():
    proc = subprocess.run(
        [sys.executable, "-m", "fastweights", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in proc.stdout and "info" in proc.stdout
