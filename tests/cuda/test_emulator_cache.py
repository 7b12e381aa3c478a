"""Where the CUDA emulator keeps its compiled modules: in fastweights' kernel cache
(``<FASTWEIGHTS_CACHE_DIR>/cudasim``) unless ``CUDASIM_CACHE_DIR`` moves them, shown by
``python -m fastweights cache`` and removed by ``--clear``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fastweights import _kernel_cache as kc
from fastweights.__main__ import main

pytestmark = pytest.mark.cuda_emulated

# A source of its own (never compiled by another test), so the first compile is this test's.
_SRC = 'extern "C" __global__ void h7_cache_probe(float* x) { x[threadIdx.x] = 2.f; }\n'


@pytest.fixture
def roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    if shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None:
        pytest.skip("g++ is not on PATH: the CUDA emulator cannot compile kernels")
    monkeypatch.setenv("FASTWEIGHTS_CACHE_DIR", str(tmp_path / "root"))
    monkeypatch.delenv("CUDASIM_CACHE_DIR", raising=False)
    return tmp_path / "root"


def _compile() -> None:
    import numpy as np

    from fastweights.backends.cupy.emulator import cudasim

    x = np.zeros(4, dtype=np.float32)
    cudasim.RawModule(_SRC).get_function("h7_cache_probe")((1,), (4,), (x,))
    assert (x == 2).all()


def test_modules_go_to_the_fastweights_cache_folder(roots: Path) -> None:
    _compile()
    modules = list((roots / "cudasim").glob("mod_*.so"))
    assert len(modules) == 1
    assert kc.emulator_cache_dir() == roots / "cudasim"
    usage = kc.cache_usage()
    assert usage["emulator"] == roots / "cudasim"
    assert usage["emulator_usage"] == (1, modules[0].stat().st_size)


def _fake_module(folder: Path, name: str = "mod_0123.so", size: int = 10) -> Path:
    """A stand-in for a compiled module (the other tests need no compiler run)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"x" * size)
    return path


def test_cudasim_cache_dir_still_moves_them(
    roots: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastweights.backends.cupy.emulator import cudasim

    assert cudasim.cache_dir() == roots / "cudasim"
    monkeypatch.setenv("CUDASIM_CACHE_DIR", str(tmp_path / "mine"))
    assert cudasim.cache_dir() == kc.emulator_cache_dir() == tmp_path / "mine"
    _fake_module(tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    assert kc.cache_usage()["emulator_usage"] == (1, 10)
    files, size = kc.clear_cache()
    assert (files, size) == (1, 10)  # only the emulator's modules, never the user's files
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_cli_cache_shows_and_clears_both_folders(
    roots: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_module(roots / "cudasim", size=2**20)
    _fake_module(roots / "numba" / "some-build", "k.nbi")
    (roots / "keep.txt").write_text("not ours")
    assert main(["cache"]) == 0
    shown = capsys.readouterr().out
    assert f"CUDA emulator: {roots / 'cudasim'}  (1 files, 1.0 MiB" in shown, shown
    assert "1 folders, 1 files" in shown, shown
    assert main(["cache", "--clear"]) == 0
    cleared = capsys.readouterr().out
    assert "removed 2 files, 1.0 MiB" in cleared and str(roots / "cudasim") in cleared, cleared
    assert not (roots / "numba").exists() and not (roots / "cudasim").exists()
    assert (roots / "keep.txt").exists()  # only what fastweights writes is removed
    assert main(["cache"]) == 0
    assert f"CUDA emulator: {roots / 'cudasim'}  (0 files" in capsys.readouterr().out
