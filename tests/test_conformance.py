"""The conformance suite of :mod:`fastweights.testing`, run on every available backend, and
checked to fail on backends that are wrong."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _support import FakeBackend, available_backends, namespace

from fastweights.testing import check_backend, parametrize_checks


def _all_checks() -> list[Any]:
    checks = [
        p for b in available_backends() for p in parametrize_checks(b.name, xp=namespace(b.name))
    ]
    # dask's forms, golden and streaming checks take ~3 min (a graph per case): the quick
    # subset (-m "not slow") keeps its input checks, and tests/test_dask.py.
    return [
        pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id)
        if str(p.id).startswith(("dask-forms", "dask-golden", "dask-streaming"))
        else p
        for p in checks
    ]


@pytest.mark.parametrize("check", _all_checks())
def test_conformance(check: Any) -> None:
    check()


def test_every_backend_gets_golden_forms_streaming_decoding_and_error_checks() -> None:
    ids = [p.id for p in parametrize_checks("reference")]
    assert len(ids) == len(set(ids))
    for kind in ("golden-", "forms-", "streaming-", "decoding-", "inputs-"):
        assert any(kind in i for i in ids), kind
    assert "reference-errors" in ids


def test_suite_fails_a_backend_that_is_off_by_1e_9(plugins: Any) -> None:
    plugins(wrong=FakeBackend("wrong", priority=-1, perturb=1e-9))
    with pytest.raises(AssertionError) as info:
        check_backend("wrong", dtypes=("float64",))
    text = str(info.value)
    assert "wrong-golden-gated_delta_rule_g1" in text
    assert "wrong-forms-kda" in text
    assert "relative RMS error" in text


def test_suite_fails_a_backend_that_drops_the_initial_state(plugins: Any) -> None:
    class Forgetful(FakeBackend):
        def run(self, call: Any) -> tuple[Any, Any]:
            from dataclasses import replace

            return super().run(replace(call, initial_state=None))

    plugins(forgetful=Forgetful("forgetful", priority=-1, ops={"delta_rule": ("recurrent",)}))
    with pytest.raises(AssertionError) as info:
        check_backend("forgetful", dtypes=("float64",))
    text = str(info.value)
    assert "golden-delta_rule_state" in text and "streaming-delta_rule" in text
    assert "golden-delta_rule_basic" not in text


def test_suite_fails_a_backend_that_returns_nan(plugins: Any) -> None:
    class Broken(FakeBackend):
        def run(self, call: Any) -> tuple[Any, Any]:
            o, state = super().run(call)
            o = np.array(o, copy=True)
            o[0, -1, 0, 0] = np.nan
            return o, state

    plugins(broken=Broken("broken", priority=-1, ops={"simple_gla": ("recurrent",)}))
    with pytest.raises(AssertionError, match="non-finite"):
        check_backend("broken", dtypes=("float32",))


def test_unavailable_backend_fails_check_backend_and_is_skipped_by_parametrize(
    plugins: Any,
) -> None:
    plugins(down=FakeBackend("down", reason="needs a GPU"))
    with pytest.raises(AssertionError, match="needs a GPU"):
        check_backend("down")
    (param,) = parametrize_checks("down")
    assert any(m.name == "skip" for m in param.marks)


def test_check_backend_can_restrict_forms_and_dtypes() -> None:
    check_backend("reference", dtypes=("float16",), forms=("recurrent",))
