"""SPEC.md section 4 tolerances, as :mod:`fastweights.testing` implements them."""

from __future__ import annotations

import numpy as np
import pytest

from fastweights.testing import assert_close, relative_rms, tolerance


@pytest.mark.parametrize(
    ("dtype", "form", "name", "expected"),
    [
        ("float64", "recurrent", "", 1e-12),
        ("float64", "chunk", "gated_delta_rule_g1", 1e-12),
        ("float64", "chunk", "simple_gla_long_strong", 1e-10),
        ("float32", "recurrent", "", 1e-5),
        ("float32", "chunk", "", 5e-5),
        ("float32", "parallel", "", 5e-5),
        ("float32", "auto", "", 5e-5),
        ("float16", "recurrent", "", 5e-3),
        (np.float32, "recurrent", "", 1e-5),
    ],
)
def test_tolerance(dtype: object, form: str, name: str, expected: float) -> None:
    assert tolerance(dtype, form, name=name) == expected


def test_relative_rms() -> None:
    ref = np.array([3.0, 4.0])
    assert relative_rms(ref, ref) == 0.0
    assert relative_rms(np.array([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert relative_rms(np.array([1e-3, 0.0]), np.zeros(2)) == pytest.approx(1e-3)
    assert relative_rms(np.array([np.inf, 4.0]), ref) == np.inf
    with pytest.raises(ValueError, match="shape"):
        relative_rms(np.zeros(3), ref)


def test_assert_close_accepts_within_and_rejects_beyond_the_tolerance() -> None:
    ref = np.linspace(1.0, 2.0, 100)
    assert_close(ref * (1 + 5e-6), ref, dtype="float32", form="recurrent")
    with pytest.raises(AssertionError, match="relative RMS error"):
        assert_close(ref * (1 + 2e-5), ref, dtype="float32", form="recurrent")
    assert_close(ref * (1 + 2e-5), ref, dtype="float32", form="chunk")


def test_nan_where_the_reference_is_finite_always_fails() -> None:
    ref = np.ones(10_000)
    x = ref.copy()
    x[0] = np.nan
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(x, ref, dtype="float16", form="chunk")


def test_matching_nan_in_the_reference_passes_and_a_different_one_fails() -> None:
    ref = np.array([1.0, np.nan, 2.0])
    assert_close(ref.copy(), ref, dtype="float64", form="recurrent")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(np.array([1.0, 0.0, 2.0]), ref, dtype="float64", form="recurrent")


def test_shape_mismatch_and_none_fail() -> None:
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(2), np.zeros(3), dtype="float64", form="chunk")
    with pytest.raises(AssertionError, match="None"):
        assert_close(None, np.zeros(3), dtype="float64", form="chunk")
