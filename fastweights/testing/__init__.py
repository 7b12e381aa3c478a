"""Conformance suite, golden cases and naive oracles for fastweights backends.

A backend (built-in or a third-party plugin registered under the ``fastweights.backends``
entry-point group) proves it computes the same functions as the float64 oracle with one call::

    from fastweights.testing import check_backend
    check_backend("mybackend")                    # NumPy arrays
    check_backend("mycupy", xp=cupy)              # arrays of another namespace

or, one pytest test per check::

    import pytest
    from fastweights.testing import parametrize_checks

    @pytest.mark.parametrize("check", parametrize_checks("mybackend"))
    def test_conformance(check):
        check()

Contents
--------
check_backend, parametrize_checks
    The conformance suite.
load_golden_cases, GoldenCase
    The vendored float64 golden cases.
Call, random_call
    A call of a public op as data; random well-conditioned inputs with odd shapes.
relative_rms, tolerance, assert_close
    The tolerances of SPEC.md section 4.
naive
    Per-token NumPy loops of every op (the baseline "what a user would write").

Examples
--------
>>> import numpy as np
>>> from fastweights.testing import load_golden_cases, relative_rms, naive
>>> case = next(c for c in load_golden_cases() if c.name == "gated_delta_rule_g1")
>>> o, state = case.run(naive.gated_delta_rule, output_final_state=True)
>>> relative_rms(o, case.o) < 1e-12
True
"""

from __future__ import annotations

from . import naive
from ._cases import (
    ARG_ORDER,
    OPS,
    Call,
    Decoded,
    GoldenCase,
    load_golden_cases,
    random_call,
    run_steps,
)
from ._checks import check_backend, parametrize_checks
from ._tolerance import assert_close, relative_rms, to_namespace, to_numpy, tolerance

__all__ = [
    "ARG_ORDER",
    "OPS",
    "Call",
    "Decoded",
    "GoldenCase",
    "assert_close",
    "check_backend",
    "load_golden_cases",
    "naive",
    "parametrize_checks",
    "random_call",
    "relative_rms",
    "run_steps",
    "to_namespace",
    "to_numpy",
    "tolerance",
]
