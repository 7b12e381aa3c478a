"""The worked example plugin of the docs (docs/examples/plugin) installs, registers and conforms.

The plugin is installed with pip into a temporary folder and used from subprocesses that put
that folder on PYTHONPATH, exactly as a third-party distribution would be found: through its
``fastweights.backends`` entry point. This process's registry never sees it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastweights

PLUGIN = Path(__file__).resolve().parent.parent / "docs" / "examples" / "plugin"


def _env(target: Path) -> dict[str, str]:
    """This environment with the plugin, and the fastweights imported here, on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWEIGHTS_")}
    paths = [str(target), str(Path(fastweights.__file__).resolve().parent.parent)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(sources, site)``: a copy of the plugin's sources and the folder it is installed in."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed")
    root = tmp_path_factory.mktemp("plugin")
    # A copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    sources = root / "sources"
    shutil.copytree(
        PLUGIN,
        sources,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    site = root / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(sources),
        ],
        capture_output=True,
        text=True,
        env=_env(site),
        timeout=300,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return sources, site


_REGISTRY_SCRIPT = textwrap.dedent(
    """
    import warnings

    warnings.simplefilter("error")  # a plugin that fails to load would only warn

    import numpy as np

    from fastweights._registry import select
    from fastweights._validate import validate
    from fastweights.backends import get_backend, list_backends

    rows = {b.name: b for b in list_backends()}
    scan = rows["numpy_scan"]
    assert scan.available, scan.reason
    assert scan.source == "fastweights_numpy_scan", scan.source
    assert scan.ops == {"simple_gla": ("recurrent",), "gated_delta_rule": ("recurrent",)}
    assert sorted(scan.step_ops) == ["gated_delta_rule", "simple_gla"], scan.step_ops
    assert rows["reference"].priority < scan.priority < rows["numba"].priority

    x = np.ones((1, 3, 2, 4), dtype=np.float32)
    g, beta = np.zeros((1, 3, 2), dtype=np.float32), np.ones((1, 3, 2), dtype=np.float32)
    call = validate("gated_delta_rule", x, x, x, g=g, beta=beta)
    has_numba = get_backend("numba").unavailable() is None
    chosen = select(call, None).name
    assert chosen == ("numba" if has_numba else "numpy_scan"), chosen
    # Without numba, the plugin is chosen before the reference backend ...
    get_backend("numba").unavailable = lambda: "pretend numba is not installed"
    assert select(call, None).name == "numpy_scan"
    # ... but not for calls it rejects (float16) or ops it does not implement.
    half = validate("gated_delta_rule", *(a.astype(np.float16) for a in (x, x, x)), g=g, beta=beta)
    assert select(half, None).name == "reference"
    assert select(validate("delta_rule", x, x, x, beta=beta), None).name == "reference"
    print("registry ok")
    """
)


def test_plugin_is_listed_and_does_not_take_numpy_calls_from_numba(
    plugin: tuple[Path, Path],
) -> None:
    sources, site = plugin
    proc = subprocess.run(
        [sys.executable, "-c", _REGISTRY_SCRIPT],
        capture_output=True,
        text=True,
        cwd=sources,
        env=_env(site),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "registry ok" in proc.stdout


def test_plugin_passes_its_conformance_tests(plugin: tuple[Path, Path]) -> None:
    sources, site = plugin
    # The plugin folder is the rootdir: its own pytest options, not this repository's.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(sources),
            "-c",
            str(sources / "pyproject.toml"),
            str(sources / "tests"),
        ],
        capture_output=True,
        text=True,
        cwd=sources,
        env=_env(site),
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert " passed" in out and "skipped" not in out and "failed" not in out, out
