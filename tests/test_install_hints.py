"""Every installation hint says to install from a checkout: fastweights is not on PyPI yet."""

from __future__ import annotations

import doctest
import importlib.util
import io
import re
from pathlib import Path

import pytest

from fastweights import _install
from fastweights._install import install_hint

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_NAME = re.compile(
    r"""pip install (-e )?["'`]?fastweights(\[[\w,-]*\])?(?![\w\[-])(?!["'`]? @)"""
)
"""``pip install fastweights``, ``pip install "fastweights[numba]"``: the published package."""


def _user_facing_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder, pattern in (("fastweights", "*.py"), ("backends", "*.py"), ("docs", "*.md")):
        files += [p for p in (ROOT / folder).rglob(pattern) if "_build" not in p.parts]
    files += list((ROOT / "docs").rglob("*.py")) + list((ROOT / "tests" / "cuda").rglob("*.py"))
    return files


def test_no_hint_names_the_unpublished_package():
    assert not _install.PUBLISHED, "update this test when a release is on PyPI"
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _user_facing_files()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PUBLISHED_NAME.search(line) and path.name != "_install.py"
    ]
    assert not found, "install hints naming the unpublished package:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "numba is not installed (pip install 'fastweights[numba]')",
        'pip install "fastweights[cuda12]"',
        "pip install fastweights",
        "pip install -e fastweights[dask]",
    ],
)
def test_the_scan_finds_published_names(line):
    assert PUBLISHED_NAME.search(line)


@pytest.mark.parametrize(
    "line", ['pip install ".[numba]"', 'pip install "fastweights[numba] @ git+https://x/y"']
)
def test_the_scan_passes_checkout_installs(line):
    assert not PUBLISHED_NAME.search(line)


def test_install_hint_examples():
    assert doctest.testmod(_install).failed == 0
    assert install_hint("numba").startswith('pip install ".[numba]" in a checkout')
    assert install_hint() == (
        'pip install "." in a checkout of the repository; fastweights is not on PyPI yet'
    )


def test_install_hint_after_a_release(monkeypatch):
    monkeypatch.setattr(_install, "PUBLISHED", True)
    assert (
        install_hint("cuda12", "cuda13")
        == 'pip install "fastweights[cuda12]" or "fastweights[cuda13]"'
    )


@pytest.mark.parametrize(
    ("backend", "module", "extra"),
    [("numba", "numba", "numba"), ("cupy", "cupy", "cuda12"), ("dask", "dask", "dask")],
)
def test_unavailable_backends_say_how_to_install(monkeypatch, backend, module, extra):
    from fastweights.backends import get_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    reason = get_backend(backend).unavailable()
    assert reason.startswith(f"{module} is not installed")
    assert f'pip install ".[{extra}]"' in reason and "checkout of the repository" in reason


def test_info_says_how_to_install():
    from fastweights._cli_info import run_info

    out = io.StringIO()
    run_info(out)
    assert 'pip install ".[numba]" in a checkout of the repository' in out.getvalue()
