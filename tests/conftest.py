"""Shared configuration: hypothesis profiles and the test helpers' import path."""

from __future__ import annotations

import os
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


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Register fake plugins for one test (``plugins(name=backend)``); forgotten afterwards."""
    from _support import install_plugins

    from fastweights import _registry

    yield lambda **p: install_plugins(monkeypatch, p)
    _registry._reset()
