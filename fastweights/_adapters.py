"""What :mod:`fastweights.jax` and :mod:`fastweights.torch` share: each op's signature without
the serving keywords, and a call split into its arrays (differentiable) and its options
(static, hashable).

Neither framework is imported here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from ._ops import RULES
from .rules._rule import dims_of

SERVING = ("state_pool", "state_indices", "output_state_snapshots")
"""Keywords of the ops that the adapters leave out: a decoding pool is not differentiable."""


@functools.cache
def signature(name: str) -> inspect.Signature:
    """The public op's signature without the serving keywords."""
    import fastweights

    sig = inspect.signature(getattr(fastweights, name))
    return sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in SERVING])


def array_names(name: str) -> tuple[str, ...]:
    """The op's array arguments, in call order, then ``initial_state``."""
    return (*(a.name for a in RULES[name].arrays), "initial_state")


def split(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...], bool]:
    """A call of op ``name`` as ``(arrays, static, output_final_state)``.

    ``arrays``: the array arguments given (None left out) by name, in call order, a pair
    state as a tuple. ``static``: every other argument as sorted ``(name, value)`` pairs,
    hashable (``cu_seqlens`` as a tuple of ints); :func:`options` turns them back into
    keywords.
    """
    try:
        bound = signature(name).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
    bound.apply_defaults()
    given = dict(bound.arguments)
    output_final_state = bool(given.pop("output_final_state", False))
    arrays: dict[str, Any] = {}
    for n in array_names(name):
        x = given.pop(n, None)
        if x is None:
            continue
        arrays[n] = tuple(x) if isinstance(x, tuple | list) else x
    cu = given.get("cu_seqlens")
    if cu is not None:
        try:
            host = np.asarray(cu)
        except TypeError:  # a traced array (jax.jit): its values are not known
            host = np.empty((0, 0))
        if host.ndim != 1 or not np.issubdtype(host.dtype, np.integer):
            raise ValueError(
                "cu_seqlens must be a static 1-D integer array (a NumPy array, list or tuple) "
                f"for the adapters, got {type(cu).__name__}"
            )
        given["cu_seqlens"] = tuple(int(i) for i in host)
    try:
        static = tuple(sorted(given.items()))
        hash(static)
    except TypeError as exc:
        raise TypeError(f"{name}: options must be hashable values ({exc})") from None
    return arrays, static, output_final_state


def options(static: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The keywords of :func:`split`'s ``static`` (``cu_seqlens`` as an int64 array)."""
    out = dict(static)
    if out.get("cu_seqlens") is not None:
        out["cu_seqlens"] = np.asarray(out["cu_seqlens"], dtype=np.int64)
    return out


def leading(name: str, arg: str, normalize: bool = False) -> str | None:
    """``"B"`` if every shape argument ``arg`` may have starts with ``B``, ``"N"`` for the
    state; else None (``srwm``'s ``W0`` has no batch axis)."""
    if arg == "initial_state":
        return "N"
    rule = RULES[name]
    for a in rule.arrays:
        if a.name == arg:
            firsts = {dims_of(t)[0] for t in a.shapes}
            return "B" if firsts == {"B"} else None
    return None


def make_ops(
    build: Callable[[str], Callable[..., Any]], module: str, note: str
) -> dict[str, Callable[..., Any]]:
    """One adapter function per public op: ``build(name)`` gives its body; the function gets
    the op's signature (serving keywords left out), name and a docstring pointing to the op."""
    out = {}
    for name in RULES:
        fn = build(name)
        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = module
        fn.__signature__ = signature(name)  # type: ignore[attr-defined]
        title = (RULES[name].title or name).splitlines()[0].rstrip(".")
        fn.__doc__ = (
            f"{title}: :func:`fastweights.{name}` {note}\n\n"
            f"Same arguments as :func:`fastweights.{name}` but ``state_pool``, "
            "``state_indices`` and ``output_state_snapshots``; returns ``(o, final_state)`` "
            "(``final_state`` None unless ``output_final_state=True``)."
        )
        out[name] = fn
    return out
