"""Fixtures of the CUDA backend tests: the emulator switch and tool checks.

``cuda_emulated`` tests run the kernels on the CPU through
:mod:`fastweights.backends.cupy.emulator` (needs ``g++``); compiled modules are cached under
``CUDASIM_CACHE_DIR`` (default ``cudasim/`` in fastweights' kernel cache,
``FASTWEIGHTS_CACHE_DIR`` or ``~/.cache/fastweights``), so only a session that changed a
kernel compiles.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest


@pytest.fixture
def emulate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Route the ``cupy`` backend through the emulator for one test (NumPy arrays)."""
    if shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None:
        pytest.skip("g++ is not on PATH: the CUDA emulator cannot compile kernels")
    monkeypatch.setenv("FASTWEIGHTS_CUDA_EMULATE", "1")
    yield


@pytest.fixture(
    params=[
        "forward",
        pytest.param("reverse", marks=pytest.mark.slow),
        pytest.param("random", marks=pytest.mark.slow),
    ]
)
def order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The emulator's scheduling order of a block's threads between barriers (the quick
    subset, ``-m "not slow"``, runs forward only)."""
    monkeypatch.setenv("CUDASIM_ORDER", request.param)
    monkeypatch.setenv("CUDASIM_SEED", "7")
    return str(request.param)
