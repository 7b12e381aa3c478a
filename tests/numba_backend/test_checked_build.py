"""The checked build (``FASTWEIGHTS_NUMBA_CHECKED=1``): raw row accesses are range-checked.

A tiny kernel that uses :func:`row` wrongly (one element past the row, a negative index, a
row of a strided last axis, an out-of-range row index or address) is compiled in a
subprocess under each build: the checked build raises ``IndexError``, the fast build reads
memory next to the row without a word (the test arrays are views into larger buffers, so that
read stays inside memory the test owns)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

KERNEL = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fastweights.backends.numba._jit import CHECKED, address, jit, row

    @jit(nrt=False)
    def read(a, m, start, stop, out):
        p = row(a, 0, 0, 0, m)
        s = 0.0
        for n in range(start, stop):
            s += p[n]
        out[0] = s

    @jit(nrt=False)
    def write(a, m, n):
        p = row(a, 0, 0, 0, m)
        p[n] = -1.0

    @jit(nrt=False)
    def where(a, i, n):
        return address(row(a, i, 0, 0, 0), n)

    buf = np.arange(16.0).reshape(1, 1, 1, 16)
    a = buf[..., :8]  # a row of 8 inside a buffer of 16
    out = np.zeros(1)
    cases = {
        "in range": lambda: read(a, 0, 0, 8, out),
        "one past the end": lambda: read(a, 0, 0, 9, out),
        "from an offset, past the end": lambda: read(a, 5, 0, 4, out),
        "negative index": lambda: read(a, 1, -1, 0, out),
        "write past the end": lambda: write(a, 2, 6),
        "strided last axis": lambda: read(buf[..., ::2], 0, 0, 8, out),
        "row index out of range": lambda: where(buf, 1, 0),
        "address past the end": lambda: where(a, 0, 8),
    }
    print("checked" if CHECKED else "fast")
    for name, case in cases.items():
        try:
            case()
        except IndexError:
            print(name, "IndexError")
        else:
            print(name, "ran")
    """
)


def _run(tmp_path: Path, checked: bool) -> dict[str, str]:
    script = tmp_path / "wrong_kernel.py"
    script.write_text(KERNEL)
    env = {
        **os.environ,
        "FASTWEIGHTS_CACHE_DIR": str(tmp_path / "cache"),
        "FASTWEIGHTS_NUMBA_CHECKED": "1" if checked else "0",
    }
    env.pop("NUMBA_BOUNDSCHECK", None)
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == ("checked" if checked else "fast")
    return dict(line.rsplit(" ", 1) for line in lines[1:])


WRONG = [
    "one past the end",
    "from an offset, past the end",
    "negative index",
    "write past the end",
    "strided last axis",
    "row index out of range",
    "address past the end",
]


@pytest.mark.slow
def test_checked_build_raises_index_error(tmp_path: Path) -> None:
    got = _run(tmp_path, checked=True)
    assert got["in range"] == "ran"
    assert {name: got[name] for name in WRONG} == dict.fromkeys(WRONG, "IndexError")
    folders = [p.name for p in (tmp_path / "cache" / "numba").iterdir()]
    assert folders and all(name.endswith("-checked") for name in folders)


@pytest.mark.slow
def test_fast_build_does_not_check(tmp_path: Path) -> None:
    """The same kernels compiled normally do not check (what the checked build is for)."""
    got = _run(tmp_path, checked=False)
    assert set(got.values()) == {"ran"}
    folders = [p.name for p in (tmp_path / "cache" / "numba").iterdir()]
    assert folders and not any("checked" in name for name in folders)


def test_builds_have_their_own_cache_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastweights import _kernel_cache as kc

    fast, checked = kc.kernel_cache_dir(False), kc.kernel_cache_dir(True)
    assert fast != checked and fast.parent == checked.parent
    monkeypatch.setenv("FASTWEIGHTS_NUMBA_CHECKED", "1")
    assert kc.numba_checked() and kc.kernel_cache_dir() == checked
    monkeypatch.setenv("FASTWEIGHTS_NUMBA_CHECKED", "0")
    assert not kc.numba_checked() and kc.kernel_cache_dir() == fast
