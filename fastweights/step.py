"""One-token decoding: each op advances a pool of states by one token, in place.

``q, k: [N, H, K]``, ``v: [N, HV, V]``, gates and ``beta`` without the ``T`` axis
(DeltaProduct: ``k: [N, n, H, K]``, ``v: [N, n, HV, V]``, ``beta: [N, n, HV(, V)]``).
``state`` is a pool ``[P, HV, K, V]`` (float32 or float64, its dtype is kept); batch row ``i``
uses ``state[state_indices[i]]`` (default ``arange(N)``, then ``P == N``). The pool is updated
in place where the namespace allows it (NumPy, CuPy, torch: the same object is returned) and
returned new otherwise (JAX). ``T`` calls give the outputs and state of one sequence call.

A read-only pool (``writeable=False``, ``np.frombuffer(bytes)``, a read-only memmap), or a
read-only half of an ``(S, z)`` pair, raises ``ValueError`` before anything is written; so do
``S`` and ``z`` sharing memory. Inputs that are views of the pool are read before the pool is
written (they are copied first), so the result is that of separate inputs.

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

from collections.abc import Callable
from typing import Any, TypeVar

from ._api import retention_gate
from ._registry import select
from ._validate import Call, validate_step

F = TypeVar("F", bound=Callable[..., Any])

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

_QKV = """\
    q, k : array
        ``[N, H, K]`` query and key of the token, one row per sequence in the batch.
    v : array
        ``[N, HV, V]`` value (``HV`` a multiple of ``H``: grouped value heads)."""

_COMMON = """\
    state : array
        The state pool ``[P, HV, K, V]``, float32 or float64 in either byte order (its dtype
        is kept). Updated in place where the namespace allows it; a read-only pool raises
        ``ValueError`` before anything is written. Inputs that are views of the pool are
        copied first (read before the update).
    scale : float, optional
        Multiplies ``q``; default ``K ** -0.5``.
    state_indices : integer array-like, optional
        ``[N]`` distinct rows of the pool that batch rows ``0 .. N-1`` use; default
        ``arange(N)`` (then ``P == N``). Rows outside it are left as they are.
    use_qk_l2norm : bool
        L2-normalise ``q`` and ``k`` inside the op (before scaling ``q``).
    backend : str, optional
        Backend name; default: chosen by array type (see :func:`fastweights.use_backend`).

    Returns
    -------
    o : array
        ``[N, HV, V]``, the dtype of ``v``. The compute dtype is float64 if any floating
        input or the pool is wider than 32 bits (``longdouble`` computes in float64), else
        float32.
    state : array
        The pool: the same object, updated in place (NumPy, CuPy, torch), or a new array
        (JAX, whose arrays are immutable)."""


def _doc(func: F) -> F:
    func.__doc__ = (
        (func.__doc__ or "").replace("{qkv}", _QKV.lstrip()).replace("{common}", _COMMON.lstrip())
    )
    return func


def _run(call: Call, backend: str | None) -> tuple[Any, Any]:
    return select(call, backend).step(call)


@_doc
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
    """One token of :func:`fastweights.linear_attn`: ``S += k v^T``, then ``o = S^T (scale q)``.

    Parameters
    ----------
    {qkv}
    normalize : bool
        Also keep the normaliser ``z += k`` and divide ``o`` by ``scale q . z + 1e-10``; then
        ``state`` is the pair of pools ``(S, z)`` with ``z: [P, HV, K]``.
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 1, 4)) for _ in range(3))   # N=2, H=1, K=V=4
    >>> pool = np.zeros((2, 1, 4, 4))
    >>> o, pool = fastweights.step.linear_attn(q, k, v, pool, scale=1.0)
    >>> bool(np.allclose(pool[0, 0], np.outer(k[0, 0], v[0, 0])))
    True
    >>> bool(np.allclose(o[0, 0], pool[0, 0].T @ q[0, 0]))
    True
    """
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


@_doc
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
    """One token of :func:`fastweights.simple_gla`: ``S = exp(g) S + k v^T``.

    Parameters
    ----------
    {qkv}
    g : array
        ``[N, HV]`` log-decay, ``<= 0`` (``-inf`` resets the state).
    {common}

    Examples
    --------
    One step equals a sequence call of length 1 with the same state:

    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 1, 4)) for _ in range(3))
    >>> g = -rng.random((2, 1))
    >>> pool = rng.standard_normal((2, 1, 4, 4))
    >>> o_seq, s_seq = fastweights.simple_gla(q[:, None], k[:, None], v[:, None], g[:, None],
    ...                                       initial_state=pool, output_final_state=True)
    >>> o, pool = fastweights.step.simple_gla(q, k, v, g, pool)
    >>> bool(np.allclose(o, o_seq[:, 0])), bool(np.allclose(pool, s_seq))
    (True, True)
    """
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


@_doc
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
    """One token of :func:`fastweights.retention` (``g_h = log(1 - 2**(-5-h))``).

    Parameters
    ----------
    {qkv}
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> q = k = v = np.ones((1, 1, 1))
    >>> pool = np.ones((1, 1, 1, 1))
    >>> o, pool = fastweights.step.retention(q, k, v, pool)
    >>> float(pool[0, 0, 0, 0])  # (1 - 1/32) * 1 + 1
    1.96875
    """
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


@_doc
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
    """One token of :func:`fastweights.gla`: ``S = Diag(exp(gk)) S + k v^T``.

    Parameters
    ----------
    {qkv}
    gk : array
        ``[N, HV, K]`` log-decay per key channel, ``<= 0``.
    {common}

    Examples
    --------
    The decay acts on the key rows of the state:

    >>> import numpy as np, fastweights
    >>> q, k, v = np.ones((1, 1, 2)), np.zeros((1, 1, 2)), np.zeros((1, 1, 3))
    >>> gk = np.log(np.array([[[0.5, 1.0]]]))
    >>> pool = np.ones((1, 1, 2, 3))
    >>> o, pool = fastweights.step.gla(q, k, v, gk, pool)
    >>> pool[0, 0, :, 0].tolist()
    [0.5, 1.0]
    """
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


@_doc
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
    """One token of :func:`fastweights.delta_rule`: ``S += k (beta (v - S^T k))^T``.

    Parameters
    ----------
    {qkv}
    beta : array
        ``[N, HV]`` write strength, or ``[N, HV, V]`` per value channel.
    {common}

    Examples
    --------
    With a unit key and ``beta = 1`` the step overwrites what the key recalls:

    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> k = np.array([[[0.6, 0.8, 0.0]]])
    >>> v = rng.standard_normal((1, 1, 2))
    >>> pool = rng.standard_normal((1, 1, 3, 2))
    >>> o, pool = fastweights.step.delta_rule(k, k, v, np.ones((1, 1)), pool, scale=1.0)
    >>> bool(np.allclose(pool[0, 0].T @ k[0, 0], v[0, 0])), bool(np.allclose(o, v))
    (True, True)
    """
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


@_doc
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
    """One token of :func:`fastweights.gated_delta_rule`: decay, then a delta step.

    Parameters
    ----------
    {qkv}
    g : array
        ``[N, HV]`` log-decay, ``<= 0``.
    beta : array
        ``[N, HV]`` write strength, or ``[N, HV, V]`` per value channel.
    {common}

    Examples
    --------
    Decoding ``T`` tokens one by one gives the outputs of one sequence call:

    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> B, T, H, K = 2, 5, 1, 8
    >>> q, k, v = (rng.standard_normal((B, T, H, K)) for _ in range(3))
    >>> g, beta = -rng.random((B, T, H)), rng.random((B, T, H))
    >>> o_seq, _ = fastweights.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
    >>> pool = np.zeros((B, H, K, K))
    >>> steps = [fastweights.step.gated_delta_rule(q[:, t], k[:, t], v[:, t], g[:, t],
    ...                                            beta[:, t], pool, use_qk_l2norm=True)[0]
    ...          for t in range(T)]
    >>> bool(np.allclose(np.stack(steps, axis=1), o_seq))
    True
    """
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


@_doc
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
    """One token of :func:`fastweights.kda`: per-key-channel decay, then a delta step.

    Parameters
    ----------
    {qkv}
    gk : array
        ``[N, HV, K]`` log-decay per key channel, ``<= 0``.
    beta : array
        ``[N, HV]`` write strength, or ``[N, HV, V]`` per value channel.
    {common}

    Examples
    --------
    Two sequences kept in rows 3 and 0 of a pool of 4:

    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 1, 4), dtype=np.float32) for _ in range(3))
    >>> gk = -rng.random((2, 1, 4), dtype=np.float32)
    >>> beta = rng.random((2, 1), dtype=np.float32)
    >>> pool = np.zeros((4, 1, 4, 4), dtype=np.float32)
    >>> o, out = fastweights.step.kda(q, k, v, gk, beta, pool, state_indices=[3, 0],
    ...                              use_qk_l2norm=True)
    >>> out is pool, [bool(np.any(pool[i])) for i in range(4)]
    (True, [True, False, False, True])
    """
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


@_doc
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
    """One token of :func:`fastweights.delta_product`: optional decay, then ``n`` delta steps.

    Parameters
    ----------
    q : array
        ``[N, H, K]`` query of the token.
    k : array
        ``[N, n, H, K]`` the token's ``n`` keys, applied in order.
    v : array
        ``[N, n, HV, V]`` the token's ``n`` values.
    beta : array
        ``[N, n, HV]`` write strengths (or ``[N, n, HV, V]``).
    g : array, optional
        ``[N, HV]`` log-decay, ``<= 0``, applied once before the ``n`` steps.
    {common}

    Examples
    --------
    With ``n = 1`` and no gate it is one delta-rule step:

    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 1, 4)) for _ in range(3))
    >>> beta = rng.random((1, 1))
    >>> p1, p2 = np.zeros((2, 1, 1, 4, 4))
    >>> o1, _ = fastweights.step.delta_product(q, k[:, None], v[:, None], beta[:, None], p1)
    >>> o2, _ = fastweights.step.delta_rule(q, k, v, beta, p2)
    >>> bool(np.allclose(o1, o2)), bool(np.allclose(p1, p2))
    (True, True)
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
