"""One-token decoding: each op advances a pool of states by one token, in place.

``q, k: [N, H, K]``, ``v: [N, HV, V]``, gates and ``beta`` without the ``T`` axis
(DeltaProduct: ``k: [N, n, H, K]``, ``v: [N, n, HV, V]``, ``beta: [N, n, HV(, V)]``).
``state`` is a pool ``[P, HV, K, V]`` (float32 or float64, its dtype is kept); batch row ``i``
uses ``state[state_indices[i]]`` (default ``arange(N)``, then ``P == N``). The pool is updated
in place where the namespace allows it (NumPy, CuPy, torch: the same object is returned) and
returned new otherwise (JAX). ``T`` calls give the outputs and state of one sequence call.

Examples
--------
>>> import numpy as np, fastweights
>>> rng = np.random.default_rng(0)
>>> pool = np.zeros((8, 2, 16, 16), dtype=np.float32)      # room for 8 sequences
>>> q, k, v = (rng.standard_normal((3, 2, 16), dtype=np.float32) for _ in range(3))
>>> g, beta = -rng.random((3, 2)), rng.random((3, 2))
>>> o, pool2 = fastweights.step.gated_delta_rule(q, k, v, g, beta, pool,
...                                              state_indices=[5, 0, 2])
>>> pool2 is pool, o.shape, bool(np.any(pool[5])), bool(np.any(pool[1]))
(True, (3, 2, 16), True, False)
"""

from __future__ import annotations

from typing import Any

from ._api import retention_gate
from ._registry import select
from ._validate import Call, validate_step

__all__ = [
    "delta_product",
    "delta_rule",
    "gated_delta_rule",
    "gla",
    "kda",
    "linear_attn",
    "retention",
    "simple_gla",
]

_KEYWORDS = """
    Keyword arguments: ``scale`` (default ``K ** -0.5``), ``state_indices`` (integer
    array-like ``[N]``, distinct rows of the pool), ``use_qk_l2norm``, ``backend``.
    Returns ``(o, state)``: ``o: [N, HV, V]`` in ``v``'s dtype, and the pool."""


def _run(call: Call, backend: str | None) -> tuple[Any, Any]:
    return select(call, backend).step(call)


def linear_attn(
    q: Any,
    k: Any,
    v: Any,
    state: Any,
    *,
    normalize: bool = False,
    scale: float | None = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """One token of :func:`fastweights.linear_attn`; with ``normalize`` ``state`` is ``(S, z)``."""
    call = validate_step(
        "linear_attn",
        q,
        k,
        v,
        state,
        scale=scale,
        state_indices=state_indices,
        use_qk_l2norm=use_qk_l2norm,
        normalize=normalize,
    )
    return _run(call, backend)


def simple_gla(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    state: Any,
    *,
    scale: float | None = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """One token of :func:`fastweights.simple_gla`; ``g: [N, HV]``."""
    call = validate_step(
        "simple_gla",
        q,
        k,
        v,
        state,
        g=g,
        scale=scale,
        state_indices=state_indices,
        use_qk_l2norm=use_qk_l2norm,
    )
    return _run(call, backend)


def retention(
    q: Any,
    k: Any,
    v: Any,
    state: Any,
    *,
    scale: float | None = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """One token of :func:`fastweights.retention` (``g_h = log(1 - 2**(-5-h))``)."""
    g = retention_gate(q, k, v, "[N, HV, V]")
    return simple_gla(
        q,
        k,
        v,
        g,
        state,
        scale=scale,
        state_indices=state_indices,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
    )


def gla(
    q: Any,
    k: Any,
    v: Any,
    gk: Any,
    state: Any,
    *,
    scale: float | None = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """One token of :func:`fastweights.gla`; ``gk: [N, HV, K]``."""
    call = validate_step(
        "gla",
        q,
        k,
        v,
        state,
        gk=gk,
        scale=scale,
        state_indices=state_indices,
        use_qk_l2norm=use_qk_l2norm,
    )
    return _run(call, backend)


def delta_rule(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    state: Any,
    *,
    scale: float | None = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """One token of :func:`fastweights.delta_rule`; ``beta: [N, HV]`` or ``[N, HV, V]``."""
    call = validate_step(
        "delta_rule",
        q,
        k,
        v,
        state,
        beta=beta,
        scale=scale,
        state_indices=state_indices,
        use_qk_l2norm=use_qk_l2norm,
    )
    return _run(call, backend)


def gated_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    state: Any,
    *,
    scale: float | None = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """One token of :func:`fastweights.gated_delta_rule`; ``g, beta: [N, HV]``."""
    call = validate_step(
        "gated_delta_rule",
        q,
        k,
        v,
        state,
        g=g,
        beta=beta,
        scale=scale,
        state_indices=state_indices,
        use_qk_l2norm=use_qk_l2norm,
    )
    return _run(call, backend)


def kda(
    q: Any,
    k: Any,
    v: Any,
    gk: Any,
    beta: Any,
    state: Any,
    *,
    scale: float | None = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """One token of :func:`fastweights.kda`; ``gk: [N, HV, K]``, ``beta: [N, HV]``."""
    call = validate_step(
        "kda",
        q,
        k,
        v,
        state,
        gk=gk,
        beta=beta,
        scale=scale,
        state_indices=state_indices,
        use_qk_l2norm=use_qk_l2norm,
    )
    return _run(call, backend)


def delta_product(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    state: Any,
    *,
    g: Any = None,
    scale: float | None = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """One token of :func:`fastweights.delta_product`; ``k: [N, n, H, K]``, ``v: [N, n, HV, V]``.

    ``beta: [N, n, HV]`` (or ``[N, n, HV, V]``), ``g: [N, HV]`` optional.
    """
    call = validate_step(
        "delta_product",
        q,
        k,
        v,
        state,
        g=g,
        beta=beta,
        scale=scale,
        state_indices=state_indices,
        use_qk_l2norm=use_qk_l2norm,
    )
    return _run(call, backend)


for _f in (
    linear_attn,
    simple_gla,
    retention,
    gla,
    delta_rule,
    gated_delta_rule,
    kda,
    delta_product,
):
    _f.__doc__ = (_f.__doc__ or "") + "\n" + _KEYWORDS
del _f
