"""Every op as a differentiable JAX function: ``jit``, ``grad`` and ``vmap`` over the kernels.

``fastweights.jax.<op>`` takes the arguments of ``fastweights.<op>`` (but the serving
keywords ``state_pool``, ``state_indices`` and ``output_state_snapshots``) and returns
``(o, final_state)`` as JAX arrays, ``final_state`` None unless ``output_final_state=True``.
It is a :func:`jax.custom_vjp` function whose forward runs ``fastweights.<op>`` on NumPy
arrays through :func:`jax.pure_callback` (the ``numba`` kernels when numba is installed, the
NumPy reference otherwise; ``backend=`` chooses as in the op) and whose backward runs
:func:`fastweights.vjp` there, then its ``pullback(do, dstate)``. The options (``scale``,
``use_qk_l2norm``, ``form``, ``chunk_size``, ``normalize``, ``num_householder``, ``solver``,
``cu_seqlens``, ``backend``, ...) are static: Python values, ``cu_seqlens`` a NumPy array or
list (it shapes the computation); ``initial_state`` is optional and differentiable.

A ``jit``-compiled loss traces one callback per op instead of JAX's autodiff through a Python
loop over tokens (the pure-JAX reference path: ``fastweights.<op>`` on JAX arrays), so it
compiles in well under a second at any ``T``.

``vmap`` folds the mapped axes into ``B`` (one kernel call for the whole batch; with
``cu_seqlens``, the mapped copies are packed one after another along ``T``); an op whose
arguments do not all start with ``B`` (``srwm``'s ``W0``) runs once per mapped element.

The backward runs the op's forward again (``fastweights.vjp`` keeps no state between
callbacks), so a gradient costs two forwards and one reverse sweep.

On a GPU (or any non-CPU) JAX device, :func:`jax.pure_callback` copies every argument to the
host and the results back: the op then runs on the host's CPU cores, at the cost of those
transfers, and the device waits for it. Use the pure-JAX reference path (``fastweights.<op>``
on the device's arrays, differentiated by JAX) to stay on the device.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import fastweights.jax as fwj
>>> q = k = v = jnp.ones((1, 8, 2, 4)) / 2
>>> beta = jnp.full((1, 8, 2), 0.5)
>>> loss = lambda q: fwj.delta_rule(q, k, v, beta)[0].sum()
>>> jax.jit(jax.grad(loss))(q).shape
(1, 8, 2, 4)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._adapters import leading, make_ops, options, split
from ._interop import is_bfloat16
from ._ops import RULES
from ._validate import validate
from .rules._rule import dims_of

Struct = tuple[tuple[str, int], ...]
"""The arrays of a call: ``(name, 0)`` for an array, ``(name, n)`` for a tuple of ``n``."""


def _flatten(arrays: dict[str, Any]) -> tuple[Struct, list[Any]]:
    struct: list[tuple[str, int]] = []
    leaves: list[Any] = []
    for name, x in arrays.items():
        if isinstance(x, tuple):
            struct.append((name, len(x)))
            leaves.extend(x)
        else:
            struct.append((name, 0))
            leaves.append(x)
    return tuple(struct), leaves


def _unflatten(struct: Struct, leaves: Sequence[Any]) -> dict[str, Any]:
    out, i = {}, 0
    for name, n in struct:
        if n:
            out[name] = tuple(leaves[i : i + n])
            i += n
        else:
            out[name] = leaves[i]
            i += 1
    return out


def _state_leaves(state: Any) -> list[Any]:
    return list(state) if isinstance(state, tuple | list) else [state]


def _fill(name: str, arg: str) -> float:
    """A value every check accepts for argument ``arg`` (gates <= 0, positive ones > 0)."""
    for a in RULES[name].arrays:
        if a.name == arg:
            return -1.0 if a.log_decay else 1.0 if a.positive else 0.0
    return 0.0


@functools.lru_cache(maxsize=512)
def _result_types(
    name: str, struct: Struct, leaves: tuple[tuple[tuple[int, ...], str], ...], static: Any
) -> tuple[jax.ShapeDtypeStruct, tuple[jax.ShapeDtypeStruct, ...]]:
    """Shapes and dtypes of ``(o, state leaves)``, from the call validated on stand-ins (NumPy
    arrays of one broadcast value each: no memory, every check of shapes and options runs)."""
    dummies = [
        np.broadcast_to(np.asarray(_fill(name, arg), dtype=_compute(dt)), shape)
        for (arg, _), (shape, dt) in zip(_expanded(struct), leaves, strict=True)
    ]
    arrays = _unflatten(struct, dummies)
    opts = options(static)
    opts.pop("backend", None)
    call = validate(name, **arrays, **opts, output_final_state=True)
    rule = RULES[name]
    sizes = {d: getattr(call, d) for d in ("B", "T", "H", "HV", "K", "V", "N")}
    if rule.sizes is not None:
        sizes.update(
            rule.sizes({n: tuple(x.shape) for n, x in arrays.items() if n != "initial_state"})
        )
        sizes["N"] = call.N
    out = jnp.dtype(dict(zip(_expanded(struct), leaves, strict=True))[rule.out, 0][1])
    o = jax.ShapeDtypeStruct((sizes["B"], sizes["T"], sizes["HV"], sizes["V"]), out)
    compute = np.dtype(call.dtype)
    layout = rule.state_layout(normalize=bool(opts.get("normalize")))
    state = tuple(
        jax.ShapeDtypeStruct(tuple(sizes[d] for d in dims_of(a.shape)), compute) for a in layout
    )
    return o, state


def _compute(dtype: str) -> np.dtype:
    """The dtype the kernels take for a leaf of dtype ``dtype`` (bfloat16 as float32)."""
    return np.dtype(np.float32) if dtype == "bfloat16" else np.dtype(dtype)


def _expanded(struct: Struct) -> list[tuple[str, int]]:
    """``(name, index)`` of every leaf of ``struct``."""
    return [(name, i) for name, n in struct for i in range(max(n, 1))]


def _host(x: Any) -> np.ndarray:
    """A callback's argument as a NumPy array the kernels take (bfloat16 as float32)."""
    a = np.asarray(x)
    return a.astype(np.float32) if is_bfloat16(a.dtype) else a


def _batched(
    fn: Callable[[list[np.ndarray], np.ndarray | None], list[np.ndarray]],
    leaves: Sequence[Any],
    ndims: Sequence[int],
    kinds: Sequence[str | None],
    out_kinds: Sequence[str | None],
    cu: np.ndarray | None,
) -> list[np.ndarray]:
    """``fn(leaves, cu_seqlens)`` on a callback's arguments, which ``vmap`` (with
    ``vmap_method="broadcast_all"``) gives leading mapped axes, all alike. Those fold into
    ``B`` (and ``N``) when every argument starts with ``B`` or ``N`` (``kinds``); with
    ``cu_seqlens`` the copies are packed along ``T`` instead; else ``fn`` runs per element."""
    xs = [_host(x) for x in leaves]
    extra = xs[0].ndim - ndims[0]
    if extra == 0:
        return fn(xs, cu)
    batch = xs[0].shape[:extra]
    n = math.prod(batch)
    flat = [x.reshape(n, *x.shape[extra:]) for x in xs]
    if all(k is not None for k in kinds):
        if cu is None:
            outs = fn([x.reshape(n * x.shape[1], *x.shape[2:]) for x in flat], None)
            outs = [y.reshape(n, y.shape[0] // n, *y.shape[1:]) for y in outs]
        else:
            T = int(cu[-1])
            packed = np.concatenate([cu[:-1] + i * T for i in range(n)] + [[n * T]])
            outs = fn(
                [
                    x.reshape(1, n * x.shape[2], *x.shape[3:])
                    if k == "B"
                    else x.reshape(n * x.shape[1], *x.shape[2:])
                    for x, k in zip(flat, kinds, strict=True)
                ],
                packed,
            )
            outs = [
                y.reshape(n, 1, y.shape[1] // n, *y.shape[2:])
                if k == "B"
                else y.reshape(n, y.shape[0] // n, *y.shape[1:])
                for y, k in zip(outs, out_kinds, strict=True)
            ]
    else:
        each = [fn([x[i] for x in flat], cu) for i in range(n)]
        outs = [np.stack(ys) for ys in zip(*each, strict=True)]
    return [y.reshape(*batch, *y.shape[1:]) for y in outs]


@functools.lru_cache(maxsize=256)
def _differentiable(name: str, struct: Struct, static: Any) -> Callable[..., Any]:
    """The ``custom_vjp`` function of one op, array layout and set of options."""
    import fastweights

    op = getattr(fastweights, name)
    opts = options(static)
    cu = opts.pop("cu_seqlens", None)
    kinds = [leading(name, arg) for arg, _ in _expanded(struct)]

    def types(leaves: Sequence[Any]) -> tuple[Any, tuple[Any, ...]]:
        key = tuple((tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves)
        return _result_types(name, struct, key, static)

    def forward(*leaves: Any) -> tuple[Any, Any]:
        o_type, s_types = types(leaves)
        ndims = [x.ndim for x in leaves]
        out_kinds = ["B", *("N" for _ in s_types)]

        def run(xs: list[np.ndarray], cu_: np.ndarray | None) -> list[np.ndarray]:
            o, state = op(**_unflatten(struct, xs), **opts, cu_seqlens=cu_, output_final_state=True)
            outs = [o, *_state_leaves(state)]
            return [np.asarray(y, t.dtype) for y, t in zip(outs, (o_type, *s_types), strict=True)]

        def host(*xs: Any) -> tuple[np.ndarray, ...]:
            return tuple(_batched(run, xs, ndims, kinds, out_kinds, cu))

        outs = jax.pure_callback(host, (o_type, *s_types), *leaves, vmap_method="broadcast_all")
        state = outs[1] if len(s_types) == 1 else tuple(outs[1:])
        return outs[0], state

    @jax.custom_vjp
    def f(*leaves: Any) -> tuple[Any, Any]:
        return forward(*leaves)

    def f_fwd(*leaves: Any) -> tuple[tuple[Any, Any], tuple[Any, ...]]:
        return forward(*leaves), leaves

    def f_bwd(leaves: tuple[Any, ...], cts: tuple[Any, Any]) -> tuple[Any, ...]:
        do, dstate = cts
        dstates = _state_leaves(dstate)
        in_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
        ndims = [x.ndim for x in (*leaves, do, *dstates)]
        bwd_kinds = [*kinds, "B", *("N" for _ in dstates)]
        count = len(leaves)

        def run(xs: list[np.ndarray], cu_: np.ndarray | None) -> list[np.ndarray]:
            arrays = _unflatten(struct, xs[:count])
            _, _, pullback = fastweights.vjp(op, **arrays, **opts, cu_seqlens=cu_)
            ds = xs[count + 1 :]
            grads = pullback(xs[count], ds[0] if len(ds) == 1 else tuple(ds))
            flat = [
                g
                for arg, _ in struct
                for g in (grads[arg] if isinstance(grads[arg], tuple) else (grads[arg],))
            ]
            return [np.asarray(g, t.dtype) for g, t in zip(flat, in_types, strict=True)]

        def host(*xs: Any) -> tuple[np.ndarray, ...]:
            return tuple(_batched(run, xs, ndims, bwd_kinds, kinds, cu))

        return tuple(
            jax.pure_callback(host, in_types, *leaves, do, *dstates, vmap_method="broadcast_all")
        )

    f.defvjp(f_fwd, f_bwd)
    return f


def _build(name: str) -> Callable[..., Any]:
    def fn(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        arrays, static, keep = split(name, args, kwargs)
        struct, leaves = _flatten(arrays)
        f = _differentiable(name, struct, static)
        o, state = f(*(jnp.asarray(x) for x in leaves))
        return o, state if keep else None

    return fn


_OPS = make_ops(_build, __name__, "as a differentiable JAX function (``jit``, ``grad``, ``vmap``)")
globals().update(_OPS)

__all__ = sorted(_OPS)  # built from the registry
