"""``python -m fastweights bench``: progress, statistics, machine report, JSON, plot, options.

The machine's limits are measured on tiny problems here (a 64^3 matmul, a 1 MiB copy, no
pause) so that each run takes well under a second on the reference backend.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from fastweights import _bench
from fastweights.__main__ import main

SHAPES = ["1,16,1,8", "2,8,1,4,8"]


@pytest.fixture(autouse=True)
def _small_limits(monkeypatch):
    monkeypatch.setattr(_bench, "MATMUL_N", 64)
    monkeypatch.setattr(_bench, "COPY_BYTES", 2**20)
    monkeypatch.setattr(_bench, "BLAS_SPIN", 0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run with every output, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setattr(_bench, "MATMUL_N", 64)
    mp.setattr(_bench, "COPY_BYTES", 2**20)
    mp.setattr(_bench, "BLAS_SPIN", 0.0)
    out, err = _capture(
        lambda: main(
            ["bench", "--ops", "gla,delta_rule", "--backends", "reference", "dask"]
            + ["--shapes", *SHAPES, "--repeats", "3", "--json", str(folder / "r.json")]
            + (["--plot", str(folder / "r.png")] if _has_matplotlib() else [])
        )
    )
    mp.undo()
    report = json.loads((folder / "r.json").read_text())
    return types.SimpleNamespace(out=out, err=err, report=report, folder=folder)


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _capture(fn):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert fn() == 0
    return out.getvalue(), err.getvalue()


def test_progress_has_one_line_per_measurement(run):
    lines = [x for x in run.err.splitlines() if x.startswith("bench [")]
    # matmul, copy, per shape the NumPy loop and 2 ops, matmul again
    assert len(lines) == 2 + 2 * 3 + 1
    assert lines[0].startswith("bench [1/9] float32 matmul 64^3: ")
    assert lines[-1].startswith("bench [9/9] float32 matmul 64^3, again: ")
    assert any("gla / reference  B=2 T=8 H=1 K=4 V=8: " in x and "median" in x for x in lines)


def test_json_report_schema(run):
    r = run.report
    assert r["schema"] == _bench.SCHEMA
    assert set(r) >= {"machine", "load_average_before", "load_average_after", "limits"}
    m = r["machine"]
    assert m["cpu"] and m["logical_cores"] >= 1 and m["numpy"] == np.__version__
    assert isinstance(m["env"], dict) and isinstance(m["blas"], list)
    if r["load_average_before"] is not None:
        assert len(r["load_average_before"]) == 3 and len(r["load_average_after"]) == 3
    assert r["config"]["shapes"] == [
        {"B": 1, "T": 16, "H": 1, "K": 8, "V": 8},
        {"B": 2, "T": 8, "H": 1, "K": 4, "V": 8},
    ]
    assert {(x["op"], x["backend"]) for x in r["results"]} == {
        ("gla", "reference"),
        ("delta_rule", "reference"),
    }
    assert len(r["results"]) == 4 and len(r["numpy_loop"]) == 2
    for cell in [*r["results"], *r["numpy_loop"], *r["limits"].values()]:
        stats = cell if "median" in cell else cell["seconds"]
        assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
        assert len(stats["samples"]) >= 3
    cell = next(x for x in r["results"] if x["shape"]["B"] == 2 and x["op"] == "delta_rule")
    assert cell["tokens_per_s"]["median"] == pytest.approx(16 / cell["seconds"]["median"])
    flops = _bench.flops_per_token("delta_rule", 1, 4, 8) * 16
    assert cell["gflops"]["max"] == pytest.approx(flops / cell["seconds"]["min"] / 1e9)
    mm = r["limits"]["matmul_gflops"]["median"]
    assert cell["percent_of_matmul"] == pytest.approx(100 * cell["gflops"]["median"] / mm)
    assert {s["backend"] for s in r["skipped"]} == {"dask"}


def test_text_report_names_machine_and_spread(run):
    out = run.out
    assert run.report["machine"]["cpu"] in out
    assert "load average (1/5/15 min)" in out and "BLAS threads idle" in out
    assert "min-max ms" in out and "B=2 T=8 H=1 K=4 V=8" in out
    assert "skipped dask for gla, delta_rule:" in out


def test_plot_is_written(run):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed")
    assert (run.folder / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--backends", "reference", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "checkout" in err
    assert "bench [" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ops", "gla,nope"], "unknown op 'nope' in --ops"),
        (["--backends", "nope"], "unknown backend 'nope' in --backends"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--shapes", "1,8,1,4", "--length", "8"], "either --shapes or --length"),
        (["--dim", "0"], "--dim must be at least 1"),
        (["--max-time", "0"], "--max-time must be positive"),
        (["--json", "/no/such/folder/r.json"], "--json /no/such/folder/r.json: the folder"),
    ],
)
def test_invalid_options_name_the_option(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["1,8,1", "1,8,1,0", "a,b,c,d"])
def test_bad_shapes_are_usage_errors(shape, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--shapes", shape])
    assert exc.value.code == 2
    assert "--shapes" in capsys.readouterr().err


def test_spread_statistics():
    s = _bench.Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max) == (2.5, 1.0, 10.0)
    assert (s.q1, s.q3) == (1.75, 4.75)
    rate = s.rate(10.0)
    assert (rate.min, rate.max, rate.median) == (1.0, 10.0, pytest.approx((10 / 3 + 5) / 2))


def test_matmul_is_timed_after_a_pause(monkeypatch):
    """Warm-up, a pause (BLAS threads idle), the timed calls, a pause again."""
    events = []
    fake = types.SimpleNamespace(
        asarray=np.asarray,
        matmul=lambda a, b: events.append("matmul"),
        cuda=types.SimpleNamespace(
            get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None)
        ),
    )
    monkeypatch.setattr(_bench.time, "sleep", lambda s: events.append(f"sleep {s}"))
    _bench.matmul_rates(fake, n=8, repeat=3, pause=0.25)
    assert events == ["matmul", "sleep 0.25", "matmul", "matmul", "matmul", "sleep 0.25"]


def test_environment_and_coretype_note(monkeypatch, run):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    info = _bench.machine_info()
    assert info["env"]["OPENBLAS_CORETYPE"] == "Haswell"
    report = {**run.report, "machine": info}
    text = "\n".join(_bench.notes(report))
    assert "OPENBLAS_CORETYPE=Haswell is set" in text
    assert "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in text
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert not any(
        "CORETYPE" in n for n in _bench.notes({**run.report, "machine": _bench.machine_info()})
    )


def test_busy_machine_note():
    report = {
        "machine": {"env": {}, "usable_cores": 2},
        "load_average_before": [3.0, 1.0, 1.0],
        "load_average_after": [0.1, 0.1, 0.1],
        "limits": {"matmul_gflops": {"median": 100.0}, "matmul_gflops_after": {"median": 50.0}},
    }
    text = "\n".join(_bench.notes(report))
    assert "busy" in text and "3.00 on 2 cores" in text
    assert "moved from 100.0 to 50.0" in text


def test_timings_stop_at_the_budget():
    calls = []
    assert len(_bench.timings(lambda: calls.append(1), repeat=5)) == 5
    assert len(_bench.timings(lambda: calls.append(1), repeat=5, budget=0.0)) == 1
    assert len(calls) == 6


def test_max_time_limits_the_repeats(tmp_path, capsys):
    path = tmp_path / "r.json"
    argv = ["bench", "--ops", "gla", "--backends", "reference", "--shapes", "1,8,1,4"]
    assert main([*argv, "--repeats", "4", "--max-time", "1e-9", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["config"]["max_time_s"] == 1e-9
    assert len(report["results"][0]["seconds"]["samples"]) == 1
    assert "1 call)" in capsys.readouterr().err
