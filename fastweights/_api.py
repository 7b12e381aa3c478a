"""The public ops, sequence form: validate, pick a backend, run.

Layout (API.md): ``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]`` with ``HV = G * H``, gates
``[B, T, HV]`` or ``[B, T, HV, K]``, state ``[N, HV, K, V]`` stored key-first; every op reads
after it writes, ``o_t = S_t^T (scale * q_t)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from array_api_compat import device

from ._registry import select
from ._validate import Call, _check_rank, _namespace, is_float64_like, validate

F = TypeVar("F", bound=Callable[..., Any])

_COMMON = """\
    scale : float, optional
        Multiplies ``q``; default ``K ** -0.5``.
    initial_state : array, optional
        ``[N, HV, K, V]`` state before the first step (zeros if None); ``N = B``, or the
        number of packed sequences.
    output_final_state : bool
        Return the state after the last step (else None). A bool: arrays and other truthy
        objects raise ``TypeError``.
    cu_seqlens : integer array-like, optional
        ``[N + 1]`` boundaries of packed sequences along ``T`` (``B == 1``); each sequence has
        its own initial and final state.
    use_qk_l2norm : bool
        L2-normalise ``q`` and ``k`` inside the op (before scaling ``q``).
    form : {"auto", "recurrent", "chunk", "parallel"}
        Which form computes the result; all agree to rounding. ``"auto"`` lets the backend
        choose.
    chunk_size : int
        Chunk length of the chunk form.
    backend : str, optional
        Backend name; default: chosen by array type (see :func:`fastweights.use_backend`).

    Returns
    -------
    o : array
        ``[B, T, HV, V]``, the dtype of ``v``.
    final_state : array or None
        ``[N, HV, K, V]`` in the compute dtype: float64 if any floating input is wider than
        32 bits (float64 in either byte order; ``longdouble`` is computed in float64), else
        float32."""


def retention_gate(q: Any, k: Any, v: Any, v_layout: str) -> Any:
    """RetNet's fixed log-decay ``g_h = log(1 - 2**(-5-h))`` per value head ``h``.

    Broadcast to ``v.shape[:-1]`` (a read-only view), float64 if any of ``q, k, v`` is.
    """
    xp = _namespace("v", v)
    _check_rank("v", v, v_layout.count(",") + 1, v_layout)
    heads = [math.log(1.0 - 2.0 ** (-5 - h)) for h in range(v.shape[-2])]
    wide = any(x is not None and is_float64_like(x) for x in (q, k, v))
    g_head = xp.asarray(heads, dtype=xp.float64 if wide else xp.float32, device=device(v))
    return xp.broadcast_to(g_head, tuple(v.shape[:-1]))


def _doc(func: F) -> F:
    func.__doc__ = (func.__doc__ or "").replace("{common}", _COMMON.lstrip())
    return func


def _run(call: Call, backend: str | None) -> tuple[Any, Any]:
    return select(call, backend).run(call)


@_doc
def linear_attn(
    q: Any,
    k: Any,
    v: Any,
    *,
    normalize: bool = False,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """Linear attention: the Hebbian fast weight update ``S_t = S_{t-1} + k_t v_t^T``.

    With ``normalize=True`` the output is divided by ``q~_t . z_t + 1e-10`` where
    ``z_t = z_{t-1} + k_t`` (use positive feature maps upstream); the state is then the pair
    ``(S, z)`` with ``z: [N, HV, K]``, in ``initial_state`` and in the returned state.

    Parameters
    ----------
    q, k : array
        ``[B, T, H, K]`` queries and keys.
    v : array
        ``[B, T, HV, V]`` values.
    normalize : bool
        Divide by the running normaliser (see above).
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 5, 2, 4)) for _ in range(3))
    >>> o, S = fastweights.linear_attn(q, k, v, scale=1.0, output_final_state=True)
    >>> bool(np.allclose(S[0, 0], k[0, :, 0].T @ v[0, :, 0]))
    True
    """
    call = validate(
        "linear_attn",
        q,
        k,
        v,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        form=form,
        chunk_size=chunk_size,
        normalize=normalize,
    )
    return _run(call, backend)


@_doc
def simple_gla(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """Linear attention with a scalar decay per head: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``.

    The rule of RetNet, Mamba2/SSD (``exp(g) = exp(dt A)``, ``k = B``, ``q = C``,
    ``v = dt x``), Lightning Attention and gated RFA; fla's ``chunk_simple_gla``.

    Parameters
    ----------
    q, k : array
        ``[B, T, H, K]``.
    v : array
        ``[B, T, HV, V]``.
    g : array
        ``[B, T, HV]`` log-decay, ``<= 0``; ``-inf`` resets the state to zero.
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> q = k = v = np.ones((1, 3, 1, 2))
    >>> g = np.log(np.full((1, 3, 1), 0.5))
    >>> o, _ = fastweights.simple_gla(q, k, v, g, scale=1.0)
    >>> o[0, :, 0, 0].tolist()  # 2 * (1, 1 + 1/2, 1 + 1/2 + 1/4)
    [2.0, 3.0, 3.5]
    """
    call = validate(
        "simple_gla",
        q,
        k,
        v,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        form=form,
        chunk_size=chunk_size,
    )
    return _run(call, backend)


@_doc
def retention(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """RetNet's retention: :func:`simple_gla` with the fixed decay ``1 - 2**(-5-h)``.

    Value head ``h = 0 .. HV-1`` has ``g_h = log(1 - 2**(-5-h))``.

    Parameters
    ----------
    q, k : array
        ``[B, T, H, K]``.
    v : array
        ``[B, T, HV, V]``.
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> q = k = v = np.ones((1, 2, 1, 1))
    >>> o, _ = fastweights.retention(q, k, v)
    >>> float(o[0, 1, 0, 0])  # 1 + (1 - 1/32)
    1.96875
    """
    g = retention_gate(q, k, v, "[B, T, HV, V]")
    return simple_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        form=form,
        chunk_size=chunk_size,
        backend=backend,
    )


@_doc
def gla(
    q: Any,
    k: Any,
    v: Any,
    gk: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """Gated linear attention: ``S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_t^T``.

    The decay acts on the key channels (rows of the key-first state); fla's ``chunk_gla``.
    It has no parallel form.

    Parameters
    ----------
    q, k : array
        ``[B, T, H, K]``.
    v : array
        ``[B, T, HV, V]``.
    gk : array
        ``[B, T, HV, K]`` log-decay per key channel, ``<= 0``.
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> q = k = np.ones((1, 2, 1, 2)); v = np.ones((1, 2, 1, 1))
    >>> gk = np.log(np.array([1.0, 0.5]))[None, None, None, :].repeat(2, axis=1)
    >>> o, _ = fastweights.gla(q, k, v, gk, scale=1.0)
    >>> float(o[0, 1, 0, 0])  # channel 0 keeps 1 + 1, channel 1 keeps 1/2 + 1
    3.5
    """
    call = validate(
        "gla",
        q,
        k,
        v,
        gk=gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        form=form,
        chunk_size=chunk_size,
    )
    return _run(call, backend)


@_doc
def delta_rule(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """DeltaNet: ``S_t = S_{t-1} + k_t (beta_t * (v_t - S_{t-1}^T k_t))^T``.

    One step of online regression (the Widrow-Hoff rule) of values on keys with rate
    ``beta``; with unit keys and ``beta = 1`` the write replaces what key ``k_t`` stored.
    fla's ``chunk_delta_rule``.

    Parameters
    ----------
    q, k : array
        ``[B, T, H, K]``.
    v : array
        ``[B, T, HV, V]``.
    beta : array
        ``[B, T, HV]``, or ``[B, T, HV, V]`` per value channel (recurrent form only).
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> k = np.array([1.0, 0.0]).reshape(1, 1, 1, 2).repeat(2, axis=1)
    >>> v = np.array([3.0, 5.0]).reshape(1, 2, 1, 1)
    >>> o, _ = fastweights.delta_rule(k, k, v, np.ones((1, 2, 1)), scale=1.0)
    >>> o[0, :, 0, 0].tolist()  # the second write overwrites the first
    [3.0, 5.0]
    """
    call = validate(
        "delta_rule",
        q,
        k,
        v,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        form=form,
        chunk_size=chunk_size,
    )
    return _run(call, backend)


@_doc
def gated_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """Gated DeltaNet: decay, then a delta step.

    ``S' = exp(g_t) S_{t-1}``; ``S_t = S' + k_t (beta_t * (v_t - S'^T k_t))^T``.
    fla's ``chunk_gated_delta_rule``.

    Parameters
    ----------
    q, k : array
        ``[B, T, H, K]``.
    v : array
        ``[B, T, HV, V]``.
    g : array
        ``[B, T, HV]`` log-decay, ``<= 0``.
    beta : array
        ``[B, T, HV]``, or ``[B, T, HV, V]`` (recurrent form only).
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 100, 4, 64))
    >>> v = rng.standard_normal((1, 100, 4, 64))
    >>> g, beta = -rng.random((1, 100, 4)), rng.random((1, 100, 4))
    >>> o_chunk, _ = fastweights.gated_delta_rule(q, k, v, g, beta, form="chunk")
    >>> o_rec, _ = fastweights.gated_delta_rule(q, k, v, g, beta, form="recurrent")
    >>> bool(np.allclose(o_chunk, o_rec))
    True
    """
    call = validate(
        "gated_delta_rule",
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        form=form,
        chunk_size=chunk_size,
    )
    return _run(call, backend)


@_doc
def kda(
    q: Any,
    k: Any,
    v: Any,
    gk: Any,
    beta: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """Kimi Delta Attention: the gated delta rule with a per-key-channel decay.

    ``S' = Diag(exp(gk_t)) S_{t-1}``; ``S_t = S' + k_t (beta_t * (v_t - S'^T k_t))^T``.
    It has no parallel form.

    Parameters
    ----------
    q, k : array
        ``[B, T, H, K]``.
    v : array
        ``[B, T, HV, V]``.
    gk : array
        ``[B, T, HV, K]`` log-decay per key channel, ``<= 0``.
    beta : array
        ``[B, T, HV]``, or ``[B, T, HV, V]`` (recurrent form only).
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 6, 1, 3))
    >>> v = rng.standard_normal((1, 6, 1, 2))
    >>> gk, beta = -rng.random((1, 6, 1, 3)), rng.random((1, 6, 1))
    >>> o, state = fastweights.kda(q, k, v, gk, beta, output_final_state=True)
    >>> o.shape, state.shape
    ((1, 6, 1, 2), (1, 1, 3, 2))
    """
    call = validate(
        "kda",
        q,
        k,
        v,
        gk=gk,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        form=form,
        chunk_size=chunk_size,
    )
    return _run(call, backend)


@_doc
def delta_product(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    *,
    num_householder: int,
    g: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """DeltaProduct: ``num_householder`` delta steps per token, after an optional decay.

    ``k``, ``v`` and ``beta`` have ``T * n`` rows (``n = num_householder``): rows
    ``t*n .. t*n+n-1`` are token ``t``'s steps. ``g`` (``[B, T, HV]``, optional) decays the
    state once per token before its steps; the output is read after the last step. With
    ``cu_seqlens`` (which counts tokens), sequence ``i`` owns rows ``n*cu[i] : n*cu[i+1]``.
    The chunk form chunks the ``T * n`` steps (``chunk_size`` counts steps).

    Parameters
    ----------
    q : array
        ``[B, T, H, K]``.
    k : array
        ``[B, T * n, H, K]``.
    v : array
        ``[B, T * n, HV, V]``.
    beta : array
        ``[B, T * n, HV]``, or ``[B, T * n, HV, V]`` (recurrent form only).
    num_householder : int
        Steps per token, ``n >= 1``.
    g : array, optional
        ``[B, T, HV]`` log-decay per token, ``<= 0``.
    {common}

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 1, 3))
    >>> k = rng.standard_normal((1, 8, 1, 3)); v = rng.standard_normal((1, 8, 1, 2))
    >>> o, _ = fastweights.delta_product(q, k, v, np.ones((1, 8, 1)), num_householder=2)
    >>> o.shape
    (1, 4, 1, 2)
    """
    call = validate(
        "delta_product",
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        form=form,
        chunk_size=chunk_size,
        num_householder=num_householder,
    )
    return _run(call, backend)
