"""``fastweights.vjp``: gradients of any op in closed form, without an autodiff framework."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from . import _api
from ._ops import RULES
from ._registry import gradient_backend, select
from ._validate import validate


def _op_name(op: Any) -> str:
    name = op if isinstance(op, str) else getattr(op, "__name__", None)
    public = isinstance(op, str) or getattr(op, "__module__", "") == "fastweights"
    if public and name in RULES:
        return name
    raise TypeError(f"op must be a fastweights op or its name (e.g. 'gla'), got {op!r}")


def _check_cotangent(name: str, x: Any, like: Any, xp: Any) -> Any:
    """``x`` as an array of ``like``'s shape in its namespace, or a clear error."""
    if isinstance(like, tuple):
        if not isinstance(x, tuple | list) or len(x) != len(like):
            raise TypeError(f"{name} must be a pair like the final state, got {type(x).__name__}")
        return tuple(
            _check_cotangent(f"{name}[{i}]", a, b, xp)
            for i, (a, b) in enumerate(zip(x, like, strict=True))
        )
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    try:
        floating = xp.isdtype(dtype, "real floating")
    except Exception:
        floating = False
    if not floating:
        raise TypeError(f"{name} must have a real floating dtype, got {dtype}")
    if tuple(shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(shape)}")
    if type(x) is not type(like) and not isinstance(x, type(like)):
        raise TypeError(
            f"{name} must be an array of the same type as the output "
            f"({type(like).__name__}), got {type(x).__name__}"
        )
    return x


def vjp(
    op: Callable[..., Any] | str, *args: Any, backend: str | None = None, **kwargs: Any
) -> tuple[Any, Any, Callable[..., dict[str, Any]]]:
    """Run ``op(*args, **kwargs)`` and return ``(o, final_state, pullback)``, like ``jax.vjp``.

    ``pullback(do, dstate=None)`` returns the gradients of ``sum(o * do) + sum(final_state *
    dstate)`` with respect to every floating array argument given (``q``, ``k``, ``v``, the
    rule's gates and vectors, ``initial_state``), by name, each with its argument's shape and
    dtype: the vector-Jacobian product of the op. ``dstate=None`` means zeros. Gradients are
    with respect to the raw arguments: through ``use_qk_l2norm``, ``scale``, the sum over
    grouped value heads and per packed sequence. They are computed in closed form by a reverse
    sweep of the form the forward ran (recurrent, or chunkwise for the chunk and parallel
    forms) that keeps the inputs and the states at chunk boundaries only and recomputes inside
    each chunk: memory ``O(B T HV (K + V + C) + T / C * N HV K V)`` (``C`` the chunk size).
    The backend that ran the forward computes them if it can (the ``gradient`` of
    :func:`fastweights.plan` says which), else the reference backend. A log-decay of
    ``-inf`` (a reset) has gradient 0.

    The pullback reads the arguments when it is called (it keeps references, not copies):
    update parameters in place only after the backward pass. ``op`` is a public op
    (``fastweights.gated_delta_rule``) or its name. ``state_pool`` and
    ``output_state_snapshots`` are not differentiable (``ValueError``); ``final_state`` is
    always returned.

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 6, 2, 4)) for _ in range(3))
    >>> beta = np.full((1, 6, 2), 0.5)
    >>> o, S, pullback = fastweights.vjp(fastweights.delta_rule, q, k, v, beta)
    >>> grads = pullback(np.ones_like(o))
    >>> sorted(grads), grads["beta"].shape
    (['beta', 'k', 'q', 'v'], (1, 6, 2))
    """
    name = _op_name(op)
    rule = RULES[name]
    public = getattr(_api, name)
    bound = inspect.signature(public).bind(*args, backend=backend, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    requested = arguments.pop("backend")
    for key in ("state_pool", "state_indices"):
        if arguments.get(key) is not None:
            raise ValueError(f"{key} is not differentiable: vjp runs from initial_state")
    if arguments.get("output_state_snapshots"):
        raise ValueError("output_state_snapshots is not differentiable")
    arguments["output_final_state"] = True
    call = validate(name, **arguments)
    chosen = select(call, requested)
    o, final = chosen.run(call)
    planner = getattr(chosen, "plan", None)
    form = planner(call)["form"] if planner is not None else call.form
    graded = dataclasses.replace(call, form=form)
    raw = {a.name: arguments[a.name] for a in rule.arrays if arguments.get(a.name) is not None}
    if call.initial_state is not None:
        raw["initial_state"] = arguments["initial_state"]

    def pullback(do: Any, dstate: Any = None) -> dict[str, Any]:
        xp = call.xp
        do = _check_cotangent("do", do, o, xp)
        if dstate is not None:
            dstate = _check_cotangent("dstate", dstate, final, xp)
        gb, _ = gradient_backend(chosen, graded)
        grads = gb.vjp(graded, do, dstate)  # type: ignore[attr-defined]
        if rule.parent is not None and rule.grads_from_parent is not None:
            grads = rule.grads_from_parent(xp, {**raw}, grads)
        return {n: _like(xp, grads[n], x) for n, x in raw.items()}

    return o, final, pullback


def _like(xp: Any, g: Any, x: Any) -> Any:
    """``g`` in the dtype of the argument ``x`` (a pair for a pair state)."""
    if isinstance(x, tuple | list):
        return tuple(_like(xp, a, b) for a, b in zip(g, x, strict=True))
    return xp.astype(g, x.dtype)
