"""The examples in :mod:`fastweights.testing`'s docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
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
