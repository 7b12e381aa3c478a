"""The fastweights conformance suite, one pytest test per check, on the installed plugin."""

import pytest

from fastweights.testing import parametrize_checks


@pytest.mark.parametrize("check", parametrize_checks("numpy_scan"))
def test_conformance(check):
    check()
