"""Shared configuration: hypothesis profiles and the test helpers' import path."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# `_support` holds helpers shared by the test files (--import-mode=importlib leaves tests/ off
# sys.path).
sys.path.insert(0, str(Path(__file__).parent))

_EXAMPLES = int(os.environ.get("FASTWEIGHTS_TEST_EXAMPLES", "12"))
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("default", max_examples=_EXAMPLES, **_COMMON)
settings.register_profile("ci", max_examples=max(_EXAMPLES, 40), **_COMMON)
settings.register_profile("quick", max_examples=3, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        help="the quick subset: no `slow` tests, each parametrized test on a covering set of "
        "its cases (every value of every parameter at least once), 3 hypothesis examples",
    )


def _quick(config: pytest.Config) -> bool:
    return bool(config.getoption("quick", False))


def pytest_configure(config: pytest.Config) -> None:
    """``--quick`` (and ``-m "not slow"``) run 3 hypothesis examples per property test unless
    ``HYPOTHESIS_PROFILE`` names a profile; ``--quick`` also leaves out the ``slow`` tests."""
    marks = " ".join(str(config.getoption("markexpr", "") or "").split())
    if _quick(config) and not marks:
        config.option.markexpr = "not slow"
        marks = "not slow"
    if "not slow" in marks and "HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("quick")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--quick``, each parametrized test keeps a covering set of its cases: walking
    them in order, a case stays when its id (``gla_basic-numba-chunk-float32``,
    ``gla-q=str``) brings a word not yet seen, so every op, backend, form, dtype and argument
    a test is parametrized over still runs at least once."""
    if not _quick(config):
        return
    seen: dict[tuple[str, str], set[str]] = {}
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is None:
            keep.append(item)
            continue
        group = (str(item.path), getattr(item, "originalname", item.name))
        pairs = set(re.split(r"[-=]", str(spec.id)))
        covered = seen.setdefault(group, set())
        if pairs - covered:
            covered |= pairs
            keep.append(item)
        else:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Register fake plugins for one test (``plugins(name=backend)``); forgotten afterwards."""
    from _support import install_plugins

    from fastweights import _registry

    yield lambda **p: install_plugins(monkeypatch, p)
    _registry._reset()
