"""The rule model: descriptions read by everything, backends' declared tables, instance rules
rewritten before dispatch, plans, and constants defined once."""

from __future__ import annotations

import inspect
import re
from importlib import resources

import numpy as np
import pytest
from _support import FakeBackend

import fastweights
import fastweights.step
from fastweights import _ops
from fastweights._registry import _can_run
from fastweights._validate import validate
from fastweights.backends import (
    L2NORM_EPS,
    NORMALIZE_EPS,
    OPS,
    RULES,
    Arg,
    Rule,
    cuda_defines,
    get_backend,
)
from fastweights.rules._rule import step_shape
from fastweights.testing import random_call

COMMON = ["scale", "initial_state", "output_final_state", "cu_seqlens", "use_qk_l2norm"]
COMMON += ["form", "chunk_size", "backend", "state_pool", "state_indices"]
COMMON += ["output_state_snapshots"]
STEP_COMMON = ["scale", "state_indices", "use_qk_l2norm", "backend"]


def _params(func: object) -> tuple[list[str], list[str]]:
    sig = inspect.signature(func)  # type: ignore[arg-type]
    positional = [p.name for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    keyword = [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]
    return positional, keyword


@pytest.mark.parametrize("name", sorted(RULES))
def test_public_signature_is_the_description(name: str) -> None:
    rule = RULES[name]
    positional, keyword = _params(getattr(fastweights, name))
    assert positional == list(rule.positional)
    keyword_args = [a.name for a in rule.args if a.keyword_only]
    common = [c for c in COMMON if c in rule.common or c == "backend"]
    assert sorted(keyword) == sorted([*keyword_args, *rule.option_names, *common])
    default = inspect.signature(getattr(fastweights, name)).parameters.get("scale")
    if default is not None:
        assert default.default == rule.default_scale


@pytest.mark.parametrize("name", sorted(RULES))
def test_step_signature_is_the_description(name: str) -> None:
    rule = RULES[name]
    positional, keyword = _params(getattr(fastweights.step, name))
    assert positional == [*(a.name for a in rule.arrays if a.step and not a.keyword_only), "state"]
    options = [o.name for o in rule.options if o.step]  # DeltaProduct: n is k.shape[1]
    keyword_args = [a.name for a in rule.args if a.keyword_only]
    common = [c for c in STEP_COMMON if c in rule.common or c in ("backend", "state_indices")]
    assert sorted(keyword) == sorted([*keyword_args, *options, *common])


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("module", [fastweights, fastweights.step])
def test_generated_docstrings_list_every_array(name: str, module: object) -> None:
    doc = getattr(module, name).__doc__
    step = module is fastweights.step
    rows = "num_householder" in RULES[name].option_names
    for arg in RULES[name].arrays:
        if step and not arg.step:
            assert not re.search(rf"^{arg.name} : array", doc, re.M)
            continue
        shape = (
            step_shape(arg.shape, rows)
            if step
            else arg.shape.replace("R", "T * n" if rows else "T")
        )
        assert re.search(rf"^{arg.name} : array\n    ``{re.escape(shape)}``", doc, re.M)
    assert "{params}" not in doc and "{common}" not in doc
    if step:  # the pool, in the rule's own state layout
        layout = ", ".join(f"[P{a.shape[2:]}" for a in RULES[name].state)
        assert re.search(r"^state : array\n    The state pool", doc, re.M)
        assert layout in doc.replace("``", "")
    for common in RULES[name].common:
        assert re.search(rf"^{common} : ", doc, re.M) or (step and common != "scale"), common


def test_step_shape_drops_tokens() -> None:
    assert step_shape("[B, T, HV, K]", rows=False) == "[N, HV, K]"
    assert step_shape("[B, R, HV]", rows=True) == "[N, n, HV]"
    assert step_shape("[B, R, HV]", rows=False) == "[N, HV]"


def test_instances_name_a_parent_that_backends_implement() -> None:
    for rule in RULES.values():
        if rule.parent is not None:
            assert rule.parent in OPS and rule.to_parent is not None
            assert rule.name not in OPS
    assert {r.name for r in RULES.values() if r.parent} == {"retention", "iplr", "rwkv7"}


def _fake_rule(monkeypatch: pytest.MonkeyPatch) -> Rule:
    fake = Rule(
        "fake_rule",
        "delta",
        "S_t = S_{t-1} + k_t v_t^T, but not really",
        (Arg("x", "[B, T, HV]", "some gate."),),
        ("recurrent",),
    )
    monkeypatch.setitem(_ops.RULES, fake.name, fake)
    monkeypatch.setitem(_ops.OPS, fake.name, fake)
    monkeypatch.setattr(_ops, "ARG_NAMES", _ops.ARG_NAMES | {"x"})
    return fake


@pytest.mark.parametrize("backend", ["numba", "cupy"])
def test_backends_decline_a_rule_they_did_not_declare(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTWEIGHTS_CUDA_EMULATE", "1")  # cupy available, on NumPy arrays
    _fake_rule(monkeypatch)
    q = np.ones((1, 3, 1, 4), dtype=np.float32)
    call = validate("fake_rule", q, q, q, x=np.zeros((1, 3, 1), dtype=np.float32))
    b = get_backend(backend)
    if b.unavailable():
        pytest.skip(f"{backend}: {b.unavailable()}")
    assert "fake_rule" not in b.ops and "fake_rule" not in b.step_ops
    assert _can_run(b, call) == "it does not implement fake_rule"
    with pytest.raises(TypeError, match="does not implement fake_rule"):
        fastweights._registry.select(call, backend)


@pytest.mark.parametrize("backend", ["numba", "cupy"])
def test_backend_tables_name_only_known_ops_and_forms(backend: str) -> None:
    b = get_backend(backend)
    for op, forms in b.ops.items():
        assert op in OPS
        assert set(forms) <= set(OPS[op].forms)
    assert set(b.step_ops) <= set(b.ops)


@pytest.mark.parametrize(
    ("op", "parent"), [("rwkv7", "dplr"), ("iplr", "dplr"), ("retention", "simple_gla")]
)
def test_instance_runs_on_a_backend_that_declares_only_its_parent(
    op: str, parent: str, plugins: object
) -> None:
    fake = FakeBackend("parent_only", ops={parent: ("recurrent",)})
    plugins(parent_only=fake)  # type: ignore[operator]
    call = random_call(op, batch=1, length=5)
    o, _ = call.run(getattr(fastweights, op), backend="parent_only", form="recurrent")
    assert fake.calls == [parent]
    want, _ = call.run(getattr(fastweights, op), backend="reference", form="recurrent")
    np.testing.assert_array_equal(o, want)


def test_validation_names_the_new_arguments() -> None:
    d = random_call("dplr", batch=1, length=4).arrays
    args = [d[n] for n in ("q", "k", "v", "a", "b", "gk")]
    with pytest.raises(ValueError, match=r"^b must have shape \[B, T, HV, K\]"):
        fastweights.dplr(*args[:4], args[4][..., :3], args[5])
    with pytest.raises(ValueError, match=r"^gk is a log-decay"):
        fastweights.dplr(*args[:5], -args[5] + 0.5)
    with pytest.raises(TypeError, match="iplr needs b, got None"):
        fastweights.iplr(*args[:4], None)
    with pytest.raises(ValueError, match="form='parallel' is not available for this iplr"):
        fastweights.iplr(*args[:5], form="parallel")


def test_plan_reports_the_choice_without_running(plugins: object) -> None:
    fake = FakeBackend("spy", priority=100, ops={"simple_gla": ("recurrent",)})
    plugins(spy=fake)  # type: ignore[operator]
    call = random_call("gla", batch=1, length=40)
    args, kwargs = call.arguments()
    p = fastweights.plan(fastweights.gla, *args, **kwargs)
    assert fake.calls == []
    assert p.passed_over["spy"] == "it does not implement gla"
    numba = get_backend("numba")
    if numba.unavailable() is None:
        assert (p.backend, p.form) == ("numba", "recurrent")
        assert p.params["threads"] >= 1
        chunked = fastweights.plan(fastweights.gla, *args, **kwargs, form="chunk", chunk_size=10**6)
        assert chunked.params["chunk_size"] == 40  # the longest sequence
    ref = fastweights.plan(fastweights.gla, *args, **kwargs, backend="reference", form="chunk")
    assert (ref.backend, ref.form, ref.params) == ("reference", "chunk", {"chunk_size": 64})
    r = random_call("iplr", batch=1, length=4)
    rargs, rkw = r.arguments()
    assert fastweights.plan(fastweights.iplr, *rargs, **rkw).op == "dplr"
    pool = np.zeros((3, 2, 12, 7))
    step = fastweights.plan(
        fastweights.step.iplr, *(x[:, 0] for x in rargs), pool, state_indices=[2]
    )
    assert step.form == "recurrent" and step.op == "dplr"


def test_plan_validates_like_the_call() -> None:
    q = np.ones((1, 3, 1, 4))
    with pytest.raises(ValueError, match=r"^gk must have shape"):
        fastweights.plan(fastweights.gla, q, q, q, np.zeros((1, 3, 1)))
    with pytest.raises(TypeError, match="op must be a fastweights op"):
        fastweights.plan(np.add, q, q)


def test_cuda_sources_take_the_constants_from_python() -> None:
    root = resources.files("fastweights.backends.cupy").joinpath("kernels")
    for name in ("recurrent.cu", "common.cuh"):
        code = root.joinpath(name).read_text()
        assert not re.search(r"\b1e-0?6\b|\b1e-10\b", code), name
    from fastweights.backends.cupy import _launch

    assert set(cuda_defines()) <= set(_launch.OPTIONS)
    assert f"-DFW_L2NORM_EPS={L2NORM_EPS!r}" in cuda_defines()
    assert f"-DFW_NORMALIZE_EPS={NORMALIZE_EPS!r}" in cuda_defines()


def test_cuda_mode_and_flag_bits_match_python() -> None:
    """The compile-time MODE and run-time flag bits are written in the kernel source and in
    the launcher: the same values, checked here rather than trusted."""
    from fastweights.backends.cupy import _launch

    code = resources.files("fastweights.backends.cupy").joinpath("kernels/recurrent.cu")
    enums = dict(re.findall(r"\bFW_([A-Z0-9_]+) = (\d+),", code.read_text()))
    python = {
        "GATE_HEAD": _launch.GATE_HEAD,
        "GATE_KEY": _launch.GATE_KEY,
        "BETA_HEAD": _launch.BETA_HEAD,
        "BETA_VALUE": _launch.BETA_VALUE,
        "NORMALIZE": _launch.NORMALIZE,
        "HAS_H0": _launch.HAS_H0,
        "HAS_HT": _launch.HAS_HT,
        "HAS_CU": _launch.HAS_CU,
        "HAS_IDX": _launch.HAS_IDX,
        "L2NORM": _launch.L2NORM,
        "HAS_Z0": _launch.HAS_Z0,
        "HAS_ZT": _launch.HAS_ZT,
    }
    assert {name: int(value) for name, value in enums.items()} == python


def test_backends_import_only_the_public_toolkit() -> None:
    """The built-in backends use ``fastweights.backends`` as a plugin would: no private
    module of the core (``fastweights._*``, ``fastweights.rules._*``)."""
    root = resources.files("fastweights.backends")
    private = re.compile(r"^\s*(from|import) fastweights\.(_|rules\._)", re.M)
    offenders = []
    for path in _python_files(root):
        if path.name == "__init__.py" and path.parent.name == "backends":
            continue  # the toolkit itself re-exports the core
        if private.search(path.read_text()):
            offenders.append(path.name)
    assert offenders == []


def _python_files(folder: object) -> list:  # type: ignore[type-arg]
    out = []
    for entry in folder.iterdir():  # type: ignore[attr-defined]
        if entry.is_dir():
            out.extend(_python_files(entry))
        elif entry.name.endswith(".py"):
            out.append(entry)
    return out


def test_every_package_is_installed() -> None:
    """A rule family missing from pyproject's package list would be absent from an installed
    fastweights (the editable install of development would not show it)."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts)
        for p in (root / "fastweights").rglob("__init__.py")
    }
    found |= {
        "fastweights.backends"
        + "".join("." + part for part in p.parent.relative_to(root / "backends").parts)
        for p in (root / "backends").rglob("__init__.py")
        if "examples" not in p.parts
    }
    assert found <= listed, sorted(found - listed)
