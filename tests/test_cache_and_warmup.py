"""The per-user cache of compiled kernels, the first-compile log line and warmup.

Kernels compile in subprocesses with a temporary ``FASTWEIGHTS_CACHE_DIR`` (and a
``NUMBA_CACHE_DIR`` of their own, which fastweights must leave alone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fastweights
from fastweights import _kernel_cache as kc

CACHE_SUFFIXES = (".nbi", ".nbc")


def _python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    full.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run(
        [sys.executable, *(args or ("-c", code))],
        capture_output=True,
        text=True,
        env=full,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    return out


def _skip_if_sources_changed(digest: str) -> None:
    """Subprocesses key the cache by the sources they read: an edit of the kernels while the
    test ran (in a working tree) gives the later process another folder."""
    if kc._sources_digest.__wrapped__() != digest:
        pytest.skip("the kernel sources changed while the test ran")


def _cache_files(*folders: Path) -> dict[str, float]:
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.suffix in CACHE_SUFFIXES:
                found[str(path)] = path.stat().st_mtime
    return found


def _package_folders() -> list[Path]:
    package = Path(fastweights.__file__).resolve().parent
    backends = Path(next(iter(fastweights.backends.__path__))).resolve()
    return [package, backends]


# A decoding step (the cheapest kernel to compile) and a user's own cached numba function.
STEP = """
import numpy as np, fastweights, numba
from fastweights.backends.numba.step import step_kernel
q = k = np.ones((1, 1, 8)); v = np.ones((1, 1, 4)); beta = np.full((1, 1), 0.5)
pool = np.zeros((1, 1, 8, 4))
fastweights.step.delta_rule(q, k, v, beta, pool, backend="numba")
fastweights.step.delta_rule(q, k, v, beta, pool, backend="numba")  # no second compile
@numba.njit(cache=True)
def users_own(x):
    return x + 1
users_own(1)
hits, misses = (sum(c.values()) for c in (step_kernel._cache_hits, step_kernel._cache_misses))
print(hits, misses, getattr(step_kernel._cache, "cache_path", None))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One cold compile of the decoding kernel in a fresh cache, then a second process."""
    pytest.importorskip("numba")
    root = tmp_path_factory.mktemp("kernels")
    user_cache = tmp_path_factory.mktemp("numba_cache_dir")
    script = root.parent / "user_script.py"
    script.write_text(STEP)
    env = {"FASTWEIGHTS_CACHE_DIR": str(root / "cache"), "NUMBA_CACHE_DIR": str(user_cache)}
    digest = kc._sources_digest.__wrapped__()
    before = _cache_files(*_package_folders())
    first = _python("", env, str(script))
    after = _cache_files(*_package_folders())
    second = _python("", env, str(script))
    _skip_if_sources_changed(digest)
    return {
        "root": root / "cache",
        "env": env,
        "user_cache": user_cache,
        "first": first,
        "second": second,
        "package_before": before,
        "package_after": after,
    }


@pytest.mark.slow  # a cold numba compile in a fresh cache, in a subprocess
def test_no_cache_files_in_the_package_or_source_tree(compiled: dict[str, Any]) -> None:
    assert compiled["package_after"] == compiled["package_before"]
    where = Path(compiled["first"].stdout.split()[2])
    assert where.is_relative_to(compiled["root"] / "numba")
    assert not any(where.is_relative_to(p) for p in _package_folders())


@pytest.mark.slow  # a cold numba compile in a fresh cache, in a subprocess
def test_kernels_go_to_the_cache_folder_and_numba_cache_dir_keeps_users_functions(
    compiled: dict[str, Any],
) -> None:
    """FASTWEIGHTS_CACHE_DIR is honoured; NUMBA_CACHE_DIR still serves the user's own
    functions and receives no kernel."""
    ours = _cache_files(compiled["root"])
    assert any("step_kernel" in p for p in ours)
    users = _cache_files(compiled["user_cache"])
    assert users and all("users_own" in p for p in users)
    builds = list((compiled["root"] / "numba").iterdir())
    assert len(builds) == 1 and builds[0].name.startswith(f"fastweights-{fastweights.__version__}")


@pytest.mark.slow  # a cold numba compile in a fresh cache, in a subprocess
def test_first_process_compiles_and_logs_second_loads(compiled: dict[str, Any]) -> None:
    first, second = compiled["first"], compiled["second"]
    assert first.stdout.split()[:2] == ["0", "1"]  # hits, misses
    assert second.stdout.split()[:2] == ["1", "0"]
    # The library logs through `logging` only: INFO is not shown without a handler.
    assert "compiling" not in first.stderr


@pytest.mark.slow  # a cold numba compile in a fresh cache, in a subprocess
def test_cli_cache_shows_and_clears(compiled: dict[str, Any]) -> None:
    env = compiled["env"]
    shown = _python("", env, "-m", "fastweights", "cache").stdout
    assert str(compiled["root"]) in shown
    build = next((compiled["root"] / "numba").iterdir())
    assert build.name in shown and " 0 files" not in shown
    cleared = _python("", env, "-m", "fastweights", "cache", "--clear").stdout
    assert "removed" in cleared
    assert not (compiled["root"] / "numba").exists()
    assert compiled["root"].is_dir()  # only the numba folder is removed
    again = _python("", env, "-m", "fastweights", "cache").stdout
    assert "0 folders" in again


@pytest.mark.slow  # a cold numba compile in a fresh cache, in a subprocess
def test_unwritable_cache_folder_compiles_in_memory(tmp_path: Path) -> None:
    pytest.importorskip("numba")
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder below a file cannot be created, even by root
    env = {"FASTWEIGHTS_CACHE_DIR": str(blocker / "cache")}
    script = tmp_path / "user_script.py"
    script.write_text(STEP)
    out = _python("", env, str(script))
    assert out.stdout.split()[:3] == ["0", "1", "None"]  # compiled, not cached
    assert "cannot be written" in out.stderr and "FASTWEIGHTS_CACHE_DIR" in out.stderr


@pytest.mark.slow  # a cold numba compile in a fresh cache, in a subprocess
def test_first_compile_logs_one_line_on_the_cli(tmp_path: Path) -> None:
    pytest.importorskip("numba")
    env = {"FASTWEIGHTS_CACHE_DIR": str(tmp_path / "cache")}
    args = ("-m", "fastweights", "warmup", "--ops", "delta_rule", "gla", "--dtypes", "float64")
    digest = kc._sources_digest.__wrapped__()
    cold = _python("", env, *args, "--forms", "step")
    lines = [line for line in cold.stderr.splitlines() if "compiling numba kernel" in line]
    assert len(lines) == 1, cold.stderr
    assert "step (float64" in lines[0] and str(tmp_path) in lines[0], cold.stderr
    assert "warmup [" in cold.stderr and "2/2" in cold.stderr
    warm = _python("", env, *args, "--forms", "step")
    _skip_if_sources_changed(digest)
    assert "compiling" not in warm.stderr and "2/2" in warm.stderr


# ---------------------------------------------------------------------------- the folder


def test_platform_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FASTWEIGHTS_CACHE_DIR", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kc.cache_root() == tmp_path / "fastweights"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the spec says
    assert kc.cache_root() == Path.home() / ".cache" / "fastweights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kc.cache_root() == Path.home() / ".cache" / "fastweights"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert kc.cache_root() == Path.home() / "Library" / "Caches" / "fastweights"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    assert kc.cache_root() == tmp_path / "fastweights" / "Cache"
    monkeypatch.setenv("FASTWEIGHTS_CACHE_DIR", str(tmp_path / "mine"))
    assert kc.cache_root() == tmp_path / "mine"
    assert kc.kernel_cache_dir().parent == tmp_path / "mine" / "numba"


def test_build_folder_is_keyed_by_version_sources_and_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    base = kc.numba_build(False)
    monkeypatch.setattr(fastweights, "__version__", "9.9")
    assert kc.numba_build(False) != base and "fastweights-9.9-" in kc.numba_build(False)
    monkeypatch.undo()
    monkeypatch.setattr(kc, "_sources_digest", lambda: "0123456789abcdef")
    assert kc.numba_build(False) != base
    monkeypatch.undo()
    assert kc.numba_build(True) != base
    assert kc.numba_build(False) == base


def test_sources_digest_covers_every_kernel_module() -> None:
    paths = kc._kernel_sources()
    names = {p.name for p in paths}
    assert {"_jit.py", "_passes.py", "recurrent.py", "chunk.py", "step.py", "_layout.py"} <= names
    # The core module whose constants (L2NORM_EPS, SUB_BLOCK) numba freezes into the kernels,
    # and no other: the toolkit the kernels import (fastweights.backends) lives inside the
    # installed package but beside a source tree, and the digest must not depend on which.
    core = [p for p in paths if p.parent.name != "numba"]
    assert [p.parts[-2:] for p in core] == [("fastweights", "_constants.py")]


# ---------------------------------------------------------------------------- warmup


def test_warmup_runs_each_requested_call() -> None:
    seen: list[tuple[int, int, str]] = []
    done = fastweights.warmup(
        ops=["gla", "delta_product"],
        dtypes=["float64"],
        forms=["recurrent", "parallel", "step"],
        backend="reference",
        progress=lambda *a: seen.append(a),
    )
    # gla and delta_product have no parallel form: skipped.
    assert [(w.op, w.form) for w in done] == [
        ("gla", "recurrent"),
        ("delta_product", "recurrent"),
        ("gla", "step"),
        ("delta_product", "step"),
    ]
    assert all(w.dtype == "float64" and w.seconds >= 0 for w in done)
    assert [s[:2] for s in seen] == [(i, 4) for i in range(5)]


def test_warmup_bar_on_a_stream(capsys: pytest.CaptureFixture[str]) -> None:
    fastweights.warmup(
        ["linear_attn"], ["float32"], ["recurrent"], backend="reference", progress=True
    )
    err = capsys.readouterr().err
    assert "warmup [" in err and "1/1" in err


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"ops": ["nope"]}, ValueError, "ops"),
        ({"ops": []}, ValueError, "ops"),
        ({"ops": 3}, TypeError, "ops"),
        ({"dtypes": ["int32"]}, ValueError, "dtypes"),
        ({"dtypes": [object()]}, TypeError, "dtypes"),
        ({"forms": ["auto"]}, ValueError, "forms"),
        ({"backend": "no-such-backend"}, ValueError, "backend"),
    ],
)
def test_warmup_rejects_bad_arguments(kwargs: dict[str, Any], exc: type, word: str) -> None:
    with pytest.raises(exc, match=word):
        fastweights.warmup(**{"backend": "reference", "progress": False, **kwargs})


@pytest.mark.slow  # a cold numba compile in a fresh cache, in a subprocess
def test_demo_shows_progress_while_it_compiles() -> None:
    pytest.importorskip("numba")
    out = _python("", {}, "-m", "fastweights", "demo", "--quick", "--no-plot", "--no-bench")
    assert "warmup [" in out.stderr and "done in" in out.stderr
    assert "Table 1" in out.stdout


def test_cli_warmup_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from fastweights.__main__ import main

    assert main(["warmup", "--ops", "nope", "--backend", "reference"]) == 2
    assert "ops" in capsys.readouterr().err


def test_cli_shows_log_records_only_while_it_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import logging

    from fastweights.__main__ import main

    logger = logging.getLogger("fastweights")
    handlers, level = list(logger.handlers), logger.level
    monkeypatch.setenv("FASTWEIGHTS_CACHE_DIR", str(tmp_path))
    usage = kc.cache_usage

    def logging_usage() -> dict[str, Any]:
        logger.info("hello")
        return usage()

    monkeypatch.setattr(kc, "cache_usage", logging_usage)
    assert main(["cache"]) == 0
    out, err = capsys.readouterr()
    assert str(tmp_path) in out and "0 folders" in out
    assert "fastweights: hello" in err
    assert logger.handlers == handlers and logger.level == level
