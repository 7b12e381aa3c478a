"""The examples in the public docstrings run and print what they say.

The documentation build runs them too (``sphinx-build -b doctest``); this keeps them in the
README's test command."""

from __future__ import annotations

import doctest
import importlib
import importlib.util

import pytest

from fastweights.backends import RULES
from fastweights.backends.numba import backend as numba_backend

MODULES = [
    "fastweights",
    pytest.param(
        "fastweights._kernel_cache",
        marks=pytest.mark.skipif(
            numba_backend.unavailable() is not None,
            reason="its example warms up the numba backend",
        ),
    ),
    "fastweights._registry",
    "fastweights._serving",
    pytest.param(
        "fastweights.backends.dask",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("dask") is None, reason="dask is not installed"
        ),
    ),
    "fastweights._validate",
    "fastweights.step",
    "fastweights.testing",
    "fastweights.testing.naive",
    "fastweights.testing._cases",
    "fastweights.testing._checks",
    "fastweights.testing._tolerance",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


@pytest.mark.parametrize("module", ["fastweights", "fastweights.step"])
@pytest.mark.parametrize("name", sorted(RULES))
def test_op_examples(module: str, name: str) -> None:
    """The ops are generated from their rules' descriptions (their globals are not the
    module's, so ``testmod`` skips them): each one's example runs here."""
    func = getattr(importlib.import_module(module), name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = doctest.DocTestFinder().find(func, name=f"{module}.{name}", globs={})
    assert sum(len(t.examples) for t in tests) > 0, f"{module}.{name} has no examples"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0
