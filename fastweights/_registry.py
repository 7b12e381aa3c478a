"""Backends: the protocol, entry-point discovery and the choice of a backend for a call.

A backend is any object with the attributes of :class:`Backend`, registered under the
entry-point group ``fastweights.backends`` (the built-ins register the same way). The choice
for a call is, in order: the ``backend=`` argument, the innermost :func:`use_backend` context,
the ``FASTWEIGHTS_BACKEND`` environment variable (a preference that falls back), then the
available backend of highest priority that accepts the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._interop import Twins
from ._validate import Call

ENTRY_POINT_GROUP = "fastweights.backends"
ENV_VAR = "FASTWEIGHTS_BACKEND"


@runtime_checkable
class Backend(Protocol):
    """What fastweights asks of a backend.

    ``ops`` maps each op it implements (names of ``fastweights._ops.OPS``) to its forms;
    ``step_ops`` lists the ops it decodes. ``unavailable()`` and ``rejects(call)`` return a
    reason (str) or None; both must be cheap and must not import heavy modules before needed.
    ``run(call)`` returns ``(o, final_state)``; ``step(call)`` updates ``call.state_pool``
    (in place where the namespace allows) and returns ``(o, state)``. A backend is never
    handed an op, a decoding op or a form it did not declare; an instance rule (``retention``,
    ``iplr``, ``rwkv7``) arrives as its parent. Optionally, ``plan(call)`` returns a dict with
    the ``form`` it would run, ``why``, and its parameters (``chunk_size``, ``threads``), for
    :func:`fastweights.plan`. For gradients (:func:`fastweights.vjp`), optionally
    ``vjp(call, do, dstate) -> dict`` (the gradients of the call's raw arguments by name, in
    the compute dtype; ``call.form`` is the form the forward ran) and ``vjp_rejects(call) ->
    str | None``; a backend without them, or rejecting a call, has its gradients computed by
    the reference backend (:func:`gradient_backend`). See the plugin guide of the
    documentation for a complete example.

    Examples
    --------
    >>> import fastweights
    >>> from fastweights.backends import Backend, get_backend
    >>> isinstance(get_backend("reference"), Backend)
    True
    """

    name: str
    priority: int
    ops: Mapping[str, tuple[str, ...]]
    step_ops: tuple[str, ...]

    def unavailable(self) -> str | None: ...

    def rejects(self, call: Call) -> str | None: ...

    def run(self, call: Call) -> tuple[Any, Any]: ...

    def step(self, call: Call) -> tuple[Any, Any]: ...


@dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`list_backends`.

    Attributes
    ----------
    name : str
        The entry-point name, as given to ``backend=``.
    available : bool
        Whether it can run here (its module imports, its hardware is present).
    reason : str or None
        Why not, when it is unavailable.
    priority : int
        Rank in the automatic choice (higher first).
    ops : dict
        Op name -> the forms the backend implements.
    step_ops : tuple of str
        Ops it decodes (:mod:`fastweights.step`).
    source : str
        The module that provides it.
    dtypes : str
        The dtypes it computes, as it declares them ("" if it does not).
    limits : dict
        Limits it declares on the sizes of a call (``{"K": "1..256"}``).

    Examples
    --------
    >>> import fastweights
    >>> row = next(b for b in fastweights.backends.list_backends() if b.name == "reference")
    >>> row.available, row.priority, row.ops["kda"]
    (True, 0, ('recurrent', 'chunk'))
    """

    name: str
    available: bool
    reason: str | None
    priority: int
    ops: dict[str, tuple[str, ...]] = field(default_factory=dict)
    step_ops: tuple[str, ...] = ()
    source: str = ""
    dtypes: str = ""
    limits: dict[str, str] = field(default_factory=dict)


_lock = threading.Lock()
_backends: dict[str, Backend] | None = None
_broken: dict[str, BackendInfo] = {}
_current: ContextVar[str | None] = ContextVar("fastweights_backend", default=None)


def _load() -> dict[str, Backend]:
    global _backends
    if _backends is not None:
        return _backends
    with _lock:
        if _backends is not None:
            return _backends
        found: dict[str, Backend] = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in found:
                continue
            try:
                obj = ep.load()
                if not isinstance(obj, Backend):
                    raise TypeError(f"{ep.value} does not provide the Backend attributes")
            except Exception as exc:  # a broken plugin must never break fastweights
                warnings.warn(
                    f"fastweights backend plugin {ep.name!r} ({ep.value}) failed to load: "
                    f"{type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _broken[ep.name] = BackendInfo(
                    ep.name,
                    False,
                    f"failed to load: {type(exc).__name__}: {exc}",
                    0,
                    source=ep.value,
                )
                continue
            found[ep.name] = obj
        if "reference" not in found:
            # Not installed (a bare source tree): the oracle is always there.
            from .backends.reference import backend as reference

            found["reference"] = reference
        _backends = found
        return found


def _reset() -> None:
    """Forget discovered backends (tests that register fake plugins)."""
    global _backends
    with _lock:
        _backends = None
        _broken.clear()


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; TypeError naming the known ones otherwise.

    Examples
    --------
    >>> import fastweights
    >>> fastweights.backends.get_backend("reference").priority
    0
    >>> fastweights.backends.get_backend("no_such_backend")
    Traceback (most recent call last):
    ...
    TypeError: unknown backend 'no_such_backend'; known backends: ...
    """
    backends = _load()
    if name not in backends:
        known = ", ".join(sorted(backends))
        why = f" ({_broken[name].reason})" if name in _broken else ""
        raise TypeError(f"unknown backend {name!r}{why}; known backends: {known}")
    return backends[name]


def list_backends() -> list[BackendInfo]:
    """Every registered backend, available or not, by descending priority.

    Examples
    --------
    >>> import fastweights
    >>> [b.name for b in fastweights.backends.list_backends() if b.available][-1]
    'reference'
    """
    rows = []
    for name, b in _load().items():
        reason = b.unavailable()
        rows.append(
            BackendInfo(
                name,
                reason is None,
                reason,
                b.priority,
                dict(b.ops),
                tuple(b.step_ops),
                type(b).__module__,
                str(getattr(b, "dtypes", "") or ""),
                dict(getattr(b, "limits", {}) or {}),
            )
        )
    rows.extend(_broken.values())
    return sorted(rows, key=lambda r: (-r.priority, r.name))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (an explicit choice).

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> q = k = v = np.ones((1, 4, 1, 8))
    >>> with fastweights.use_backend("reference"):
    ...     o, _ = fastweights.linear_attn(q, k, v)
    >>> o.shape
    (1, 4, 1, 8)
    """
    get_backend(name)
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def _can_run(b: Backend, call: Call, *, arrays: bool = True) -> str | None:
    reason = b.unavailable()
    if reason:
        return reason
    ops = b.step_ops if call.is_step else b.ops
    if call.op not in ops:
        return f"it does not implement {'decoding for ' if call.is_step else ''}{call.op}"
    if not call.is_step and call.form != "auto" and call.form not in b.ops[call.op]:
        return f"it does not implement form={call.form!r} for {call.op}"
    return b.rejects(call) if arrays else None


def _runnable(b: Backend, call: Call, twins: Twins) -> tuple[Backend | None, str]:
    """``b`` if it runs ``call``; else a bridge running the call's NumPy twin (CPU torch
    tensors as NumPy views, bfloat16 as float32: :mod:`._interop`) if ``b`` runs that; else
    None and why not."""
    reason = _can_run(b, call, arrays=False)
    if reason:
        return None, reason
    reason = b.rejects(call)
    if reason is None:
        return b, ""
    bridge, why = twins.bridge(b)
    if bridge is not None:
        return bridge, ""
    return None, f"{reason}; {why}" if why else reason


def _choose(call: Call, requested: str | None) -> tuple[Backend, dict[str, str]]:
    """The backend for ``call`` and, for those of higher rank it passed over, why."""
    explicit = requested if requested is not None else _current.get()
    if explicit is not None:
        if not isinstance(explicit, str):
            raise TypeError(f"backend must be a backend name (str), got {type(explicit).__name__}")
        b = get_backend(explicit)
        chosen, reason = _runnable(b, call, Twins(call))
        if chosen is None:
            what = call.op if call.called in ("", call.op) else f"{call.called} ({call.op})"
            raise TypeError(f"backend {explicit!r} cannot run this {what} call: {reason}")
        return chosen, {}
    backends = _load()
    order = sorted(backends.values(), key=lambda b: -b.priority)
    preferred = os.environ.get(ENV_VAR)
    if preferred:
        if preferred in backends:
            order.remove(backends[preferred])
            order.insert(0, backends[preferred])
        else:
            warnings.warn(
                f"{ENV_VAR}={preferred!r} names no registered backend; ignoring it",
                RuntimeWarning,
                stacklevel=5,
            )
    passed: dict[str, str] = {}
    twins = Twins(call)
    for b in order:
        chosen, reason = _runnable(b, call, twins)
        if chosen is not None:
            return chosen, passed
        passed[b.name] = reason
    raise TypeError(f"no backend can run this {call.op} call")  # reference accepts all


def select(call: Call, requested: str | None) -> Backend:
    """The backend that runs ``call``: explicit choices raise, preferences fall back."""
    return _choose(call, requested)[0]


@dataclass(frozen=True)
class Plan:
    """How a call would run: the backend, the form and its parameters, and why.

    Attributes
    ----------
    op : str
        The op the backend runs (an instance rule's parent: ``rwkv7`` runs as ``dplr``).
    backend : str
        The backend chosen.
    form : str
        The form it runs (``"auto"`` resolved).
    params : dict
        The form's parameters the backend chose (``chunk_size``, ``threads``, ...).
    why : str
        Why this form.
    passed_over : dict
        Backends of higher rank that were not chosen, and why.
    gradient : str
        The backend that computes this call's gradients (:func:`fastweights.vjp`), and why
        it is not the chosen backend when it is not.
    """

    op: str
    backend: str
    form: str
    params: dict[str, Any]
    why: str
    passed_over: dict[str, str]
    gradient: str = ""


def gradient_backend(b: Backend, call: Call) -> tuple[Backend, str]:
    """The backend computing the gradients of ``call`` run by ``b``: ``b`` itself if it has a
    ``vjp`` that accepts the call, else the reference backend; and why not ``b``."""
    reason: str | None = f"{b.name} has no gradients"
    if getattr(b, "vjp", None) is not None:
        rejects = getattr(b, "vjp_rejects", None)
        reason = rejects(call) if rejects is not None else None
        if reason is None:
            return b, ""
    return get_backend("reference"), str(reason)


def plan_call(call: Call, requested: str | None) -> Plan:
    """The :class:`Plan` of a validated call (used by ``"auto"`` and the CLI alike)."""
    b, passed = _choose(call, requested)
    planner = getattr(b, "plan", None)
    if planner is not None:
        details = dict(planner(call))
    else:  # a plugin without plans: it chooses inside run()
        details = {"form": call.form, "why": f"{b.name} does not describe its choices"}
    form = details.pop("form")
    why = details.pop("why", "")
    if call.is_step:
        return Plan(call.op, b.name, form, details, why, passed)
    graded = dataclasses.replace(call, form=form)
    g, reason = gradient_backend(b, graded)
    gradient = g.name if not reason else f"{g.name} ({reason})"
    return Plan(call.op, b.name, form, details, why, passed, gradient)
