"""``python -m fastweights gpu-check`` without a GPU: end to end under the CPU emulator
(``--small``), its reports (JSON and Markdown: keys, rows, labels), and its exits without CuPy,
a GPU or a compiler.

fla's Triton kernels need a GPU, so the end-to-end run puts a stand-in ``fla`` package first on
the path whose kernels are :mod:`fastweights.fla`'s functions of the same names (fla's own
signatures, on torch CPU tensors): the comparison columns are then filled and check that the
check hands fla the same inputs as our kernels, in fla's argument order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from fastweights.backends.cupy import _gpu_check as gc

ROOT = Path(__file__).resolve().parents[2]
FAKE_FLA = {
    "fla/__init__.py": '__version__ = "0+stand-in"\n',
    "fla/ops/__init__.py": "",
    "fla/ops/gated_delta_rule/__init__.py": (
        "from fastweights.fla import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule\n"
    ),
    "fla/ops/kda/__init__.py": "from fastweights.fla import chunk_kda, fused_recurrent_kda\n",
    "fla/ops/generalized_delta_rule/__init__.py": (
        "from fastweights.fla import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule\n"
    ),
}
TOL = {"float16": 2e-2, "float32": 1e-4}


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture(scope="module")
def emulated_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``gpu-check --small`` run in a subprocess, with the stand-in fla when torch is
    there; its JSON, Markdown, output and wall time."""
    if shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None:
        pytest.skip("g++ is not on PATH: the CUDA emulator cannot compile kernels")
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out"
    env = dict(os.environ)
    env.pop(gc.EMULATE_ENV, None)  # --small alone turns the emulator on
    with_fla = importlib.util.find_spec("torch") is not None
    paths = [str(_write_tree(tmp / "fake", FAKE_FLA))] if with_fla else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "fastweights", "gpu-check", "--small", "--out", str(out)]
    cmd += ["--repeat", "1", "--budget", "120", "--test-timeout", "60"]
    t = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    seconds = time.perf_counter() - t
    print(f"gpu-check --small: {seconds:.1f} s wall")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {
        "json": json.loads((out / "gpu_check.json").read_text()),
        "md": (out / "gpu_check.md").read_text(),
        "log": (out / "gpu_tests.log").read_text(),
        "stdout": proc.stdout,
        "seconds": seconds,
        "with_fla": with_fla,
    }


@pytest.mark.cuda_emulated
def test_emulated_run_report_keys_and_labels(emulated_run):
    report = emulated_run["json"]
    for key in ("schema", "emulated", "timing", "card", "versions", "started", "elapsed_s"):
        assert key in report
    assert report["schema"] == gc.SCHEMA
    assert report["emulated"] is True
    assert report["timing"].startswith("EMULATED")
    assert "emulator" in report["card"]["name"]
    for key in ("python", "numpy", "fastweights", "emulator_cxx"):
        assert key in report["versions"]
    if emulated_run["with_fla"]:
        assert report["versions"]["fla"] == "0+stand-in"
        assert "torch" in report["versions"]
    assert report["failures"] == []
    assert report["exit_status"] == 0
    assert report["elapsed_s"] < report["budget_s"]
    assert "gpu-check: finished in" in emulated_run["stdout"]
    # Here the gpu tests are skipped (no CuPy device); they ran with pytest -m gpu.
    tests = report["tests"]
    assert tests["status"] in ("skipped", "passed"), tests
    assert "-m gpu" in tests["command"] and "-m gpu" in emulated_run["log"]
    assert all(t["verdict"] == "unmeasured (emulated)" for t in report["targets"])
    assert len(report["targets"]) == 5


@pytest.mark.cuda_emulated
def test_emulated_run_decode_rows(emulated_run):
    decode = emulated_run["json"]["decode"]
    assert decode["shape"] == gc.SMALL["decode"]
    rows = {r["impl"]: r for r in decode["rows"]}
    assert set(rows) == {"copy", "fastweights", "fla"}
    ours = rows["fastweights"]
    assert ours["status"] == "ok"
    for key in ("ms", "ms_per_call", "GBps", "pct_of_copy"):
        assert isinstance(ours[key], float)
    assert decode["state_bytes_per_step"] == 2 * 4 * 4 * 2 * 16 * 16
    if emulated_run["with_fla"]:
        assert rows["fla"]["status"] == "ok", rows["fla"]


@pytest.mark.cuda_emulated
def test_emulated_run_prefill_rows(emulated_run):
    prefill = emulated_run["json"]["prefill"]
    assert prefill["shape"] == gc.SMALL["prefill"]
    declared = prefill["declared_forms"]
    assert set(declared) == set(gc.PREFILL_OPS)
    rows = prefill["rows"]
    got = {(r["op"], r["form"], r["inputs"]) for r in rows}
    want = {(o, f, d) for o in gc.PREFILL_OPS for f in gc.FORMS for d in gc.DTYPES}
    assert got == want and len(rows) == len(want)
    for r in rows:
        ours, fla = r["fastweights"], r["fla"]
        assert fla["kernel"] == gc.FLA_KERNELS[r["op"]][1][r["form"]]
        if r["form"] in declared[r["op"]]:
            assert ours["status"] == "ok", r
            assert ours["ms"] > 0 and ours["Mtok_s"] > 0
        else:
            assert ours["status"] == "not built", r
        if not emulated_run["with_fla"]:
            continue
        assert fla["status"] == "ok", r
        if ours["status"] == "ok":
            # fla's argument order and our inputs: the same numbers (fla's reference here).
            assert r["rel_diff_vs_fla"] < TOL[r["inputs"]], r
            assert r["ours_over_fla"] > 0
    for r in rows:
        if r["form"] == "chunk" and {"chunk", "recurrent"} <= set(declared[r["op"]]):
            assert r["rel_diff_chunk_vs_recurrent"] < TOL[r["inputs"]], r
    # The delta family's first wave is built in the recurrent form at least.
    assert "recurrent" in declared["gated_delta_rule"]


@pytest.mark.cuda_emulated
def test_emulated_run_markdown(emulated_run):
    md = emulated_run["md"]
    assert md.startswith("# fastweights gpu-check\n")
    assert "**EMULATED:" in md
    for heading in ("## Decode step (B=4 H=2 K=16 V=16", "## Prefill (B=1 T=80", "## Targets"):
        assert heading in md
    assert "ms (emulated)" in md
    for r in emulated_run["json"]["prefill"]["rows"]:
        line = f"| {r['op']} | {r['form']} | {r['inputs']} | "
        assert md.count(line) == 1, line
        if r["fastweights"]["status"] == "not built":
            assert line + "not built |" in md
    assert md.count("unmeasured (emulated)") == 5
    assert "fastweights.step.gated_delta_rule" in md


def _report(**kw):
    """A made-up report of a GPU run, for the Markdown and the targets without a GPU."""
    decode = {
        "shape": gc.FULL["decode"],
        "state_bytes_per_step": 1,
        "copy_GBps": 4000.0,
        "rows": [
            {"what": "copy", "impl": "copy", "status": "ok", "ms": 0.5, "GBps": 4000.0,
             "pct_of_copy": 100.0, "dispatch_hidden": True},
            {"what": "ours", "impl": "fastweights", "status": "ok", "ms": 0.2, "GBps": 3000.0,
             "pct_of_copy": 75.0, "dispatch_hidden": False},
        ],
    }  # fmt: skip

    def row(form, dtype, ours_ms, fla_ms):
        return {
            "op": "gated_delta_rule", "form": form, "inputs": dtype,
            "fastweights": {"status": "ok", "ms": ours_ms, "Mtok_s": 1.0, "dispatch_hidden": True},
            "fla": {"kernel": gc.FLA_KERNELS["gated_delta_rule"][1][form], "status": "ok",
                    "ms": fla_ms, "dispatch_hidden": True},
        }  # fmt: skip

    prefill = {
        "shape": gc.FULL["prefill"],
        "rows": [
            row("chunk", "float16", 3.0, 1.0),
            row("recurrent", "float16", 9.0, 12.0),
            row("chunk", "float32", 2.0, 1.5),
            {"op": "kda", "form": "chunk", "inputs": "float32",
             "fastweights": {"status": "not built"},
             "fla": {"kernel": "chunk_kda", "status": "skipped (time budget: 3 s left)"}},
        ],
    }  # fmt: skip
    report = {
        "emulated": False,
        "card": {"name": "NVIDIA H200", "multiprocessors": 132},
        "versions": {"cupy": "14.2.0", "cuda_runtime": "13.0"},
        "started": "now",
        "elapsed_s": 200.0,
        "budget_s": 330.0,
        "repeat": 10,
        "tests": {"command": "pytest -m gpu", "status": "passed", "summary": "3 passed"},
        "decode": decode,
        "prefill": prefill,
        "targets": gc._targets(decode, prefill, emulated=False),
        "failures": [],
    }
    report.update(kw)
    return report


def test_targets_and_markdown_of_a_gpu_run():
    report = _report()
    verdicts = {t["target"]: (t["value"], t["verdict"]) for t in report["targets"]}
    assert verdicts["decode step >= 70 % of copy bandwidth"] == (75.0, "met")
    name = "prefill gated_delta_rule (float16, best form) "
    # best of ours (3.0 chunk, 9.0 recurrent) = 3.0: 3x fla's chunk, faster than its recurrent
    assert verdicts[name + "within 2x of fla chunk_gated_delta_rule"] == (3.0, "missed")
    assert verdicts[name + "faster than fla fused_recurrent_gated_delta_rule"] == (0.25, "met")
    name = "prefill gated_delta_rule (float32, best form) "
    assert verdicts[name + "within 2x of fla chunk_gated_delta_rule"] == (1.333, "met")
    assert verdicts[name + "faster than fla fused_recurrent_gated_delta_rule"][1] == (
        "unmeasured (fla not timed)"
    )
    md = gc.markdown(report)
    assert "EMULATED" not in md and "(emulated)" not in md
    assert "- card: NVIDIA H200 (multiprocessors 132)" in md
    assert "| ours | 0.200 (per call) | 3000 | 75.0 |" in md
    assert (
        "| gated_delta_rule | chunk | float16 | 3.000 | 1.00 | chunk_gated_delta_rule | 1.000 "
        in md
    )
    assert "| kda | chunk | float32 | not built |  | chunk_kda | skipped (time budget" in md


def test_no_gpu_says_why_and_exits_3(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(gc.EMULATE_ENV, raising=False)
    monkeypatch.setattr(gc, "_gpu", lambda: "cupy is not importable (test)")
    assert gc.main(["--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "gpu-check: no GPU to check: cupy is not importable (test)" in err
    assert "--small" in err
    stub = json.loads((tmp_path / "gpu_check.json").read_text())
    assert stub["status"] == "no GPU to check"
    assert stub["reason"] == "cupy is not importable (test)"


def test_unregistered_backend_says_install(monkeypatch, capsys):
    """A checkout that is not installed has no entry points: only the reference backend."""
    import fastweights.backends

    def unknown(name):
        raise TypeError(f"unknown backend {name!r}; known backends: reference")

    monkeypatch.setattr(fastweights.backends, "get_backend", unknown)
    assert gc.main(["--small", "--no-tests"]) == 3
    err = capsys.readouterr().err
    assert "the cupy backend is not registered" in err and "-e ." in err


def test_no_compiler_for_the_emulator_exits_3(monkeypatch, capsys):
    monkeypatch.setenv("CUDASIM_CXX", "/nonexistent/g++")
    assert gc.main(["--small", "--no-tests"]) == 3
    assert "is not on PATH" in capsys.readouterr().err


def test_options(capsys):
    assert gc.main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--out", "--small", "--budget", "--test-timeout", "--no-fla", "--repeat"):
        assert option in text
    assert gc.main(["--repeat", "0", "--small"]) == 2
    assert gc.main(["--no-such-option"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_cli_without_cupy():
    env = {k: v for k, v in os.environ.items() if k != gc.EMULATE_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "fastweights", "gpu-check", "--no-tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "gpu-check: no GPU to check: cupy is not importable" in proc.stderr


def test_fla_kernels_import_when_fla_init_fails(tmp_path, monkeypatch):
    """fla's ``__init__`` imports its layers (transformers); when that raises, the check
    still imports its kernels."""
    pytest.importorskip("torch")
    files = dict(FAKE_FLA)
    files["fla/__init__.py"] = "raise ImportError('a broken transformers')\n"
    monkeypatch.syspath_prepend(str(_write_tree(tmp_path, files)))
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == "fla"}
    try:
        found = gc._import_fla()
        assert not isinstance(found, str), found
        _, fla, modules = found
        assert set(modules) == set(gc.PREFILL_OPS)
        assert callable(modules["dplr"].chunk_dplr_delta_rule)
        assert Path(fla.__path__[0]) == tmp_path / "fla"
    finally:
        for m in [m for m in sys.modules if m.split(".")[0] == "fla"]:
            del sys.modules[m]
        sys.modules.update(saved)


def test_watchdog_writes_the_report_and_exits(tmp_path, monkeypatch):
    """A check still running past its budget (a kernel that hangs) writes what it has."""
    exits = []
    monkeypatch.setattr(gc.os, "_exit", exits.append)
    check = types.SimpleNamespace(
        failed=["kda chunk float16: error"], partial={"decode": _report()["decode"]}
    )
    report = _report(decode=None, prefill=None, targets=[])
    timer = gc._watchdog(report, check, tmp_path, time.perf_counter(), 0.0)
    timer.join(timeout=30)
    assert exits == [1]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["exit_status"] == 1 and saved["decode"]["rows"]
    assert saved["failures"][0] == "kda chunk float16: error"
    assert "over the budget" in saved["failures"][1]
    assert "over the budget" in (tmp_path / "gpu_check.md").read_text()
