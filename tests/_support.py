"""Helpers shared by the test files: which backends and forms to run, fake plugins."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import fastweights
from fastweights.backends import RULES, list_backends
from fastweights.testing import Call

FORMS = ("recurrent", "chunk", "parallel")


class DaskBlocks:
    """The namespace the tests give the dask backend: ``asarray`` turns a NumPy array into a
    Dask array in blocks along its first three axes, the last axis excepted (two blocks along
    ``B``, three along ``T``, two along the heads), so that every call runs with blocks along
    each. Integer arrays (``cu_seqlens``) stay NumPy arrays: the graph's shape depends on them."""

    __name__ = "dask.array"

    @staticmethod
    def asarray(x: Any) -> Any:
        import dask.array as da

        x = np.asarray(x)
        if x.dtype.kind in "iub":
            return x
        parts = (2, 3, 2)  # B or N; T (three blocks: the scan composes); heads
        chunks = tuple(
            max(1, -(-n // parts[axis])) if axis < min(3, x.ndim - 1) else n
            for axis, n in enumerate(x.shape)
        )
        return da.from_array(x, chunks=chunks)


#: Backends whose arrays are not NumPy arrays, and the namespace they take (a module name, or
#: an object with ``asarray``).
NAMESPACES: dict[str, Any] = {"cupy": "cupy", "dask": DaskBlocks}

PLUGIN_MODULE = "_fastweights_fake_plugins"


def implemented_as(op: str) -> str:
    """The op a backend lists for ``op``: an instance rule's parent (``retention`` runs as
    ``simple_gla``, ``rwkv7`` as ``dplr``)."""
    rule = RULES[op]
    while rule.parent is not None:
        rule = RULES[rule.parent]
    return rule.name


def available_backends() -> list[Any]:
    """``BackendInfo`` of every available backend."""
    return [b for b in list_backends() if b.available]


def namespace(backend: str) -> Any:
    """The array namespace backend ``backend`` takes (None for NumPy)."""
    name = NAMESPACES.get(backend)
    if name is None or not isinstance(name, str):
        return name
    return importlib.import_module(name)


def numpy_backends() -> list[Any]:
    """Available backends that take NumPy arrays."""
    return [b for b in available_backends() if b.name not in NAMESPACES]


def engines(call: Call) -> Iterator[tuple[str, str]]:
    """``(backend, form)`` of every NumPy backend and form (and ``auto``) that runs ``call``."""
    for b in numpy_backends():
        offered = b.ops.get(implemented_as(call.op))
        if offered is not None:
            for form in call.forms(offered):
                yield b.name, form


def step_backends(op: str) -> list[str]:
    """NumPy backends that decode ``op``."""
    return [b.name for b in numpy_backends() if implemented_as(op) in b.step_ops]


def run(call: Call, backend: str | None = None, form: str = "auto", **extra: Any) -> Any:
    """Run ``call`` through the public op; a ``chunk_size`` is dropped for a rule that has no
    chunk form (and so no such keyword)."""
    from fastweights.backends import RULES

    if "chunk_size" not in RULES[call.op].common:
        extra.pop("chunk_size", None)
    return call.run(getattr(fastweights, call.op), backend=backend, form=form, **extra)


def backend_form_params(op: str) -> list[Any]:
    """``pytest.param(backend, form)`` for each NumPy backend implementing ``op``."""
    out = []
    for b in numpy_backends():
        for form in (*b.ops.get(implemented_as(op), ()), "auto"):
            out.append(pytest.param(b.name, form, id=f"{b.name}-{form}"))
    return out


def reference_backend() -> Any:
    from fastweights.backends import get_backend

    return get_backend("reference")


class FakeBackend:
    """A plugin backend that records its calls and delegates to the reference.

    ``reason`` makes it unavailable, ``reject(call)`` lets it decline calls, ``perturb``
    scales its outputs by ``1 + perturb`` (a wrong backend).
    """

    def __init__(
        self,
        name: str,
        *,
        priority: int = 100,
        reason: str | None = None,
        ops: dict[str, tuple[str, ...]] | None = None,
        reject: Callable[[Any], str | None] | None = None,
        perturb: float = 0.0,
    ) -> None:
        ref = reference_backend()
        self.name = name
        self.priority = priority
        self.ops = dict(ref.ops) if ops is None else ops
        self.step_ops = tuple(op for op in ref.step_ops if op in self.ops)
        self._reason = reason
        self._reject = reject
        self._perturb = perturb
        self.calls: list[str] = []

    def unavailable(self) -> str | None:
        return self._reason

    def rejects(self, call: Any) -> str | None:
        return None if self._reject is None else self._reject(call)

    def run(self, call: Any) -> tuple[Any, Any]:
        self.calls.append(call.op)
        o, state = reference_backend().run(call)
        return (o * (1 + self._perturb) if self._perturb else o), state

    def step(self, call: Any) -> tuple[Any, Any]:
        self.calls.append(f"step.{call.op}")
        return reference_backend().step(call)


def install_plugins(monkeypatch: pytest.MonkeyPatch, plugins: dict[str, Any]) -> None:
    """Register ``plugins`` (name -> backend object, or an entry-point target string).

    Entry points are added to the ``fastweights.backends`` group through a monkeypatched
    :func:`importlib.metadata.entry_points`, exactly as an installed plugin would appear.
    """
    from fastweights import _registry

    module = types.ModuleType(PLUGIN_MODULE)
    eps = []
    for name, obj in plugins.items():
        if isinstance(obj, str):
            target = obj
        else:
            setattr(module, name, obj)
            target = f"{PLUGIN_MODULE}:{name}"
        eps.append(importlib.metadata.EntryPoint(name, target, "fastweights.backends"))
    monkeypatch.setitem(sys.modules, PLUGIN_MODULE, module)
    original = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        found = original(**params)
        if params.get("group") == "fastweights.backends":
            return [*eps, *found]
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    _registry._reset()


def copy_tree(x: Any) -> Any:
    """Deep copy of arrays in (nested) tuples, lists and dicts."""
    if isinstance(x, dict):
        return {k: copy_tree(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(copy_tree(v) for v in x)
    return np.array(x, copy=True) if isinstance(x, np.ndarray) else x


def assert_result(
    got: tuple[Any, Any], want: tuple[Any, Any], *, dtype: Any, form: str, name: str = ""
) -> None:
    """Compare ``(o, final_state)`` pairs; a state may be a pair (``(S, z)``, ``(H, G)``)."""
    from fastweights.testing import assert_close

    assert_close(got[0], want[0], dtype=dtype, form=form, name=f"{name} o")
    if isinstance(want[1], tuple):
        assert isinstance(got[1], tuple), f"{name}: expected a pair state"
        for i, (g, w) in enumerate(zip(got[1], want[1], strict=True)):
            assert_close(g, w, dtype=dtype, form=form, name=f"{name} state[{i}]")
    elif want[1] is not None:
        assert_close(got[1], want[1], dtype=dtype, form=form, name=f"{name} state")


def shared_engines(a: Call, b: Call) -> Iterator[tuple[str, str]]:
    """``(backend, form)`` that can run both ``a`` and ``b``."""
    second = set(engines(b))
    for pair in engines(a):
        if pair in second:
            yield pair
