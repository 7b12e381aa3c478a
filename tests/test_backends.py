"""API.md "Backends": choosing a backend per call, plugins, and what ``list_backends`` tells.

Order of choice: the ``backend=`` argument, else the innermost ``use_backend`` context, else
``FASTWEIGHTS_BACKEND`` (a preference that falls back), else the highest-priority backend that
accepts the call. Explicit choices that cannot run raise ``TypeError`` with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _support import FORMS, FakeBackend, implemented_as, run

import fastweights
from fastweights.backends import OPS as OPS_RULES
from fastweights.backends import list_backends
from fastweights.testing import OPS, random_call, to_numpy

CALL = random_call("gated_delta_rule", seed=0, length=9)


def _info(name: str) -> Any:
    return next(b for b in list_backends() if b.name == name)


def test_reference_is_listed_available_with_every_op_and_form() -> None:
    ref = _info("reference")
    assert ref.available and ref.reason is None
    assert isinstance(ref.priority, int)
    implemented = {implemented_as(op) for op in OPS}
    assert implemented <= set(ref.ops)
    for op, forms in ref.ops.items():
        assert forms == OPS_RULES[op].forms, op  # every form the rule has
        assert "recurrent" in forms and set(forms) <= set(FORMS), op
    for op in ("recurrent_delta_rule", "srwm"):  # inputs that depend on their own past
        assert ref.ops[op] == ("recurrent",)
    for op in ("gla", "kda", "delta_product"):
        assert "parallel" not in ref.ops[op]
    assert implemented <= set(ref.step_ops)


def test_list_backends_is_sorted_by_priority() -> None:
    priorities = [b.priority for b in list_backends()]
    assert priorities == sorted(priorities, reverse=True)


def test_unavailable_backends_tell_why() -> None:
    for b in list_backends():
        assert b.available == (b.reason is None), b.name
        assert isinstance(b.name, str) and b.name


def test_backend_argument_runs_on_that_backend(plugins: Any) -> None:
    fake = FakeBackend("fake", priority=-10)
    plugins(fake=fake)
    o_ref, _ = run(CALL, backend="reference")
    assert fake.calls == []
    o_fake, _ = run(CALL, backend="fake")
    assert fake.calls == ["gated_delta_rule"]
    np.testing.assert_array_equal(to_numpy(o_fake), to_numpy(o_ref))


def test_highest_priority_backend_that_accepts_the_call_is_chosen(plugins: Any) -> None:
    eager = FakeBackend("eager", priority=1000)
    picky = FakeBackend("picky", priority=2000, reject=lambda call: "only float32")
    plugins(eager=eager, picky=picky)
    run(CALL)
    assert eager.calls == ["gated_delta_rule"] and picky.calls == []


def test_use_backend_context_nests_and_restores(plugins: Any) -> None:
    outer, inner = FakeBackend("outer", priority=-5), FakeBackend("inner", priority=-6)
    plugins(outer=outer, inner=inner)
    with fastweights.use_backend("outer"):
        run(CALL)
        with fastweights.use_backend("inner"):
            run(CALL)
            run(CALL, backend="reference")  # the argument beats the context
        run(CALL)
    run(CALL)
    assert outer.calls == ["gated_delta_rule"] * 2
    assert inner.calls == ["gated_delta_rule"]


def test_use_backend_restores_after_an_exception(plugins: Any) -> None:
    fake = FakeBackend("fake", priority=-5)
    plugins(fake=fake)
    with pytest.raises(RuntimeError), fastweights.use_backend("fake"):
        raise RuntimeError
    run(CALL)
    assert fake.calls == []


def test_use_backend_also_picks_the_decoding_backend(plugins: Any) -> None:
    fake = FakeBackend("fake", priority=-5)
    plugins(fake=fake)
    q, k, v, g, beta = (x[:, 0] for x in (CALL.arrays[n] for n in ("q", "k", "v", "g", "beta")))
    pool = CALL.arrays["initial_state"].copy()
    with fastweights.use_backend("fake"):
        fastweights.step.gated_delta_rule(q, k, v, g, beta, pool)
    assert fake.calls == ["step.gated_delta_rule"]


def test_environment_variable_is_a_preference(plugins: Any, monkeypatch: Any) -> None:
    low = FakeBackend("low", priority=-5)
    down = FakeBackend("down", priority=-5, reason="needs a GPU")
    picky = FakeBackend("picky", priority=-5, reject=lambda call: "float32 only")
    plugins(low=low, down=down, picky=picky)
    monkeypatch.setenv("FASTWEIGHTS_BACKEND", "low")
    run(CALL)
    assert low.calls == ["gated_delta_rule"]
    monkeypatch.setenv("FASTWEIGHTS_BACKEND", "down")
    run(CALL)  # falls back instead of raising
    assert down.calls == []
    monkeypatch.setenv("FASTWEIGHTS_BACKEND", "picky")
    run(CALL)
    assert picky.calls == []
    with fastweights.use_backend("reference"):
        run(CALL)  # the context beats the variable
    assert low.calls == ["gated_delta_rule"]


def test_environment_variable_naming_no_backend_warns_and_falls_back(monkeypatch: Any) -> None:
    automatic, _ = run(CALL)
    monkeypatch.setenv("FASTWEIGHTS_BACKEND", "no-such-backend")
    with pytest.warns(RuntimeWarning, match="no-such-backend"):
        o, _ = run(CALL)
    np.testing.assert_array_equal(to_numpy(o), to_numpy(automatic))


def test_named_backend_that_cannot_run_raises_type_error_with_its_reason(plugins: Any) -> None:
    plugins(
        down=FakeBackend("down", reason="needs a GPU"),
        picky=FakeBackend("picky", reject=lambda call: "float32 only"),
        partial=FakeBackend("partial", ops={"delta_rule": ("recurrent",)}),
    )
    with pytest.raises(TypeError, match="needs a GPU"):
        run(CALL, backend="down")
    with pytest.raises(TypeError, match="needs a GPU"), fastweights.use_backend("down"):
        run(CALL)
    with pytest.raises(TypeError, match="float32 only"):
        run(CALL, backend="picky")
    with pytest.raises(TypeError, match="gated_delta_rule"):
        run(CALL, backend="partial")
    with pytest.raises(TypeError, match="chunk"):
        run(random_call("delta_rule", length=5), backend="partial", form="chunk")


def test_unknown_backend_raises_type_error() -> None:
    with pytest.raises(TypeError, match="nope"):
        run(CALL, backend="nope")
    with pytest.raises(TypeError, match="nope"), fastweights.use_backend("nope"):
        run(CALL)


def test_plugin_is_listed_with_its_ops(plugins: Any) -> None:
    plugins(
        partial=FakeBackend("partial", priority=7, ops={"delta_rule": ("recurrent",)}),
        down=FakeBackend("down", reason="needs a GPU"),
    )
    partial, down = _info("partial"), _info("down")
    assert partial.available and partial.priority == 7
    assert partial.ops == {"delta_rule": ("recurrent",)}
    assert partial.step_ops == ("delta_rule",)
    assert not down.available and down.reason == "needs a GPU"


def test_plugin_that_fails_to_import_only_warns(plugins: Any) -> None:
    plugins(broken="fastweights_no_such_module_xyz:backend")
    with pytest.warns(RuntimeWarning, match="broken"):
        names = [b.name for b in list_backends()]
    assert "reference" in names
    o, _ = run(CALL)
    assert np.all(np.isfinite(to_numpy(o)))


def test_plugin_object_without_the_backend_attributes_only_warns(plugins: Any) -> None:
    plugins(bogus=object())
    with pytest.warns(RuntimeWarning, match="bogus"):
        run(CALL)


def test_a_folder_named_numba_is_not_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory ``numba/`` on sys.path (a namespace package) must not pass for numba."""
    import importlib.machinery
    import importlib.util

    from fastweights.backends import get_backend

    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        if name == "numba":
            spec = importlib.machinery.ModuleSpec("numba", None, is_package=True)
            spec.submodule_search_locations = ["/somewhere/numba"]
            return spec
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    reason = get_backend("numba").unavailable()
    assert reason is not None and "not installed" in reason
