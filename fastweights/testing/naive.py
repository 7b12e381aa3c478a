"""Naive per-token NumPy implementations of every fastweights op.

These functions are the loop a user would write instead of calling fastweights: one Python
iteration per token, heads vectorised with NumPy, everything in float64. They are written
directly from the update rules in SPEC.md section 1 (the second wave's from RULES2.md and
their issues) and share no code with the library, so they
serve as a second oracle for the tests and as the baseline of the benchmarks.

Signatures follow the public ops (``q, k, v``, then the gates, then ``beta``; keyword-only
``scale``, ``initial_state``, ``output_final_state``, ``cu_seqlens``, ``use_qk_l2norm``) without
``form``, ``chunk_size`` and ``backend``. Inputs are converted with :func:`numpy.asarray` and
not validated. ``o`` is returned in ``v``'s dtype, the final state in float64.

Examples
--------
>>> import numpy as np
>>> from fastweights.testing import naive
>>> rng = np.random.default_rng(0)
>>> q, k = rng.standard_normal((2, 1, 5, 2, 8))
>>> v = rng.standard_normal((1, 5, 2, 4))
>>> beta = np.full((1, 5, 2), 0.5)
>>> o, state = naive.delta_rule(q, k, v, beta, output_final_state=True)
>>> o.shape, state.shape
((1, 5, 2, 4), (1, 2, 8, 4))
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "delta_product",
    "delta_rule",
    "dplr",
    "gated_delta_rule",
    "gla",
    "iplr",
    "kda",
    "linear_attn",
    "mesa_net",
    "recurrent_delta_rule",
    "retention",
    "rwkv7",
    "simple_gla",
    "srwm",
]

_L2_EPS = 1e-6
_NORM_EPS = 1e-10


def _l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + _L2_EPS)


def _segments(batch: int, length: int, cu_seqlens: Any) -> list[tuple[int, int, int]]:
    """Return ``(batch row, first token, end token)`` for every sequence."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    cu = [int(c) for c in np.asarray(cu_seqlens).reshape(-1)]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _scan(
    q: Any,
    k: Any,
    v: Any,
    *,
    g: Any = None,
    gk: Any = None,
    beta: Any = None,
    num_householder: int = 1,
    normalize: bool = False,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
) -> tuple[np.ndarray, Any]:
    """Run the generic recurrence shared by all ops.

    Per token ``t`` and value head: decay the state by ``exp(g)`` (scalar) and/or ``exp(gk)``
    (per key row), then apply ``num_householder`` writes (Hebbian ``k v^T`` when ``beta`` is
    None, otherwise the delta step ``k (beta * (v - S^T k))^T``), then read ``S^T (scale q)``.
    """
    v_dtype = np.asarray(v).dtype
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, length, heads, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    n = num_householder
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (dk**-0.5 if scale is None else scale)
    # Value head j reads query/key head j // G.
    q = np.repeat(q, hv // heads, axis=2)
    k = np.repeat(k, hv // heads, axis=2)
    # A -inf gate resets (rows of) the state to exactly zero: selected, not multiplied by 0,
    # so a NaN or Inf there does not survive it.
    g = None if g is None else np.asarray(g, dtype=np.float64)
    gk = None if gk is None else np.asarray(gk, dtype=np.float64)
    alpha = None if g is None else np.exp(g)
    alpha_k = None if gk is None else np.exp(gk)
    if beta is not None:
        beta = np.asarray(beta, dtype=np.float64)
        if beta.ndim == 3:
            beta = beta[..., None]

    segments = _segments(batch, length, cu_seqlens)
    s0, z0 = initial_state if normalize and initial_state is not None else (initial_state, None)
    states = np.zeros((len(segments), hv, dk, dv))
    if s0 is not None:
        states[...] = np.asarray(s0, dtype=np.float64)
    norms = np.zeros((len(segments), hv, dk))
    if z0 is not None:
        norms[...] = np.asarray(z0, dtype=np.float64)

    o = np.zeros((batch, length, hv, dv))
    for i, (b, start, end) in enumerate(segments):
        S = states[i]
        z = norms[i]
        for t in range(start, end):
            if g is not None and alpha is not None:
                S = np.where(g[b, t][:, None, None] == -np.inf, 0.0, alpha[b, t][:, None, None] * S)
            if gk is not None and alpha_k is not None:
                S = np.where(gk[b, t][:, :, None] == -np.inf, 0.0, alpha_k[b, t][:, :, None] * S)
            for j in range(n):
                kt, vt = k[b, t * n + j], v[b, t * n + j]
                if beta is None:
                    S = S + kt[:, :, None] * vt[:, None, :]
                else:
                    err = vt - np.einsum("hkv,hk->hv", S, kt)
                    S = S + kt[:, :, None] * (beta[b, t * n + j] * err)[:, None, :]
            ot = np.einsum("hkv,hk->hv", S, q[b, t])
            if normalize:
                z = z + k[b, t]
                ot = ot / (np.sum(q[b, t] * z, axis=-1) + _NORM_EPS)[:, None]
            o[b, t] = ot
        states[i] = S
        norms[i] = z

    final: Any = None
    if output_final_state:
        final = (states, norms) if normalize else states
    return o.astype(v_dtype, copy=False), final


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
) -> tuple[np.ndarray, Any]:
    """Linear attention, ``S_t = S_{t-1} + k_t v_t^T``.

    With ``normalize=True``, ``o_t = S_t^T q~_t / (q~_t . z_t + 1e-10)`` with
    ``z_t = z_{t-1} + k_t``; the state is the pair ``(S, z)``.

    Parameters
    ----------
    q, k : array_like
        ``[B, T, H, K]``.
    v : array_like
        ``[B, T, HV, V]``.
    normalize : bool
        Divide by the running key sum.
    scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm
        As in :func:`fastweights.linear_attn`.

    Returns
    -------
    o : numpy.ndarray
        ``[B, T, HV, V]``.
    final_state : numpy.ndarray or tuple or None
        ``[N, HV, K, V]`` (with ``z`` ``[N, HV, K]`` when normalising).

    Examples
    --------
    The loop and the library compute the same function:

    >>> import fastweights
    >>> from fastweights.testing import naive, random_call, relative_rms
    >>> call = random_call("linear_attn", length=9)
    >>> o_loop, s_loop = call.run(naive.linear_attn, output_final_state=True)
    >>> o_lib, s_lib = call.run(fastweights.linear_attn, output_final_state=True)
    >>> relative_rms(o_lib, o_loop) < 1e-12, relative_rms(s_lib, s_loop) < 1e-12
    (True, True)
    """
    return _scan(
        q,
        k,
        v,
        normalize=normalize,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
    )


def simple_gla(q: Any, k: Any, v: Any, g: Any, **common: Any) -> tuple[np.ndarray, Any]:
    """Scalar decay, ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``; ``g``: ``[B, T, HV]``.

    Keywords as in :func:`linear_attn` (without ``normalize``).

    Examples
    --------
    The loop and the library compute the same function:

    >>> import fastweights
    >>> from fastweights.testing import naive, random_call, relative_rms
    >>> call = random_call("simple_gla", length=9)
    >>> o_loop, s_loop = call.run(naive.simple_gla, output_final_state=True)
    >>> o_lib, s_lib = call.run(fastweights.simple_gla, output_final_state=True)
    >>> relative_rms(o_lib, o_loop) < 1e-12, relative_rms(s_lib, s_loop) < 1e-12
    (True, True)
    """
    return _scan(q, k, v, g=g, **common)


def retention(q: Any, k: Any, v: Any, **common: Any) -> tuple[np.ndarray, Any]:
    """:func:`simple_gla` with the fixed decay ``g_h = log(1 - 2**(-5 - h))`` per value head.

    Examples
    --------
    The loop and the library compute the same function:

    >>> import fastweights
    >>> from fastweights.testing import naive, random_call, relative_rms
    >>> call = random_call("retention", length=9)
    >>> o_loop, s_loop = call.run(naive.retention, output_final_state=True)
    >>> o_lib, s_lib = call.run(fastweights.retention, output_final_state=True)
    >>> relative_rms(o_lib, o_loop) < 1e-12, relative_rms(s_lib, s_loop) < 1e-12
    (True, True)
    """
    v_arr = np.asarray(v)
    batch, length, hv = v_arr.shape[:3]
    g_h = np.log(1.0 - 2.0 ** (-5.0 - np.arange(hv)))
    g = np.broadcast_to(g_h, (batch, length, hv))
    return _scan(q, k, v_arr, g=g, **common)


def gla(q: Any, k: Any, v: Any, gk: Any, **common: Any) -> tuple[np.ndarray, Any]:
    """Per-key-channel decay, ``S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_t^T``.

    ``gk``: ``[B, T, HV, K]``; keywords as in :func:`simple_gla`.

    Examples
    --------
    The loop and the library compute the same function:

    >>> import fastweights
    >>> from fastweights.testing import naive, random_call, relative_rms
    >>> call = random_call("gla", length=9)
    >>> o_loop, s_loop = call.run(naive.gla, output_final_state=True)
    >>> o_lib, s_lib = call.run(fastweights.gla, output_final_state=True)
    >>> relative_rms(o_lib, o_loop) < 1e-12, relative_rms(s_lib, s_loop) < 1e-12
    (True, True)
    """
    return _scan(q, k, v, gk=gk, **common)


def delta_rule(q: Any, k: Any, v: Any, beta: Any, **common: Any) -> tuple[np.ndarray, Any]:
    """DeltaNet, ``S_t = S_{t-1} + k_t (beta_t * (v_t - S_{t-1}^T k_t))^T``.

    ``beta``: ``[B, T, HV]`` or ``[B, T, HV, V]``; keywords as in :func:`simple_gla`.

    Examples
    --------
    The loop and the library compute the same function:

    >>> import fastweights
    >>> from fastweights.testing import naive, random_call, relative_rms
    >>> call = random_call("delta_rule", length=9)
    >>> o_loop, s_loop = call.run(naive.delta_rule, output_final_state=True)
    >>> o_lib, s_lib = call.run(fastweights.delta_rule, output_final_state=True)
    >>> relative_rms(o_lib, o_loop) < 1e-12, relative_rms(s_lib, s_loop) < 1e-12
    (True, True)
    """
    return _scan(q, k, v, beta=beta, **common)


def gated_delta_rule(
    q: Any, k: Any, v: Any, g: Any, beta: Any, **common: Any
) -> tuple[np.ndarray, Any]:
    """Gated DeltaNet: decay ``S' = exp(g_t) S_{t-1}``, then the delta step on ``S'``.

    Keywords as in :func:`simple_gla`.

    Examples
    --------
    The loop and the library compute the same function:

    >>> import fastweights
    >>> from fastweights.testing import naive, random_call, relative_rms
    >>> call = random_call("gated_delta_rule", length=9)
    >>> o_loop, s_loop = call.run(naive.gated_delta_rule, output_final_state=True)
    >>> o_lib, s_lib = call.run(fastweights.gated_delta_rule, output_final_state=True)
    >>> relative_rms(o_lib, o_loop) < 1e-12, relative_rms(s_lib, s_loop) < 1e-12
    (True, True)
    """
    return _scan(q, k, v, g=g, beta=beta, **common)


def kda(q: Any, k: Any, v: Any, gk: Any, beta: Any, **common: Any) -> tuple[np.ndarray, Any]:
    """Kimi Delta Attention: :func:`gated_delta_rule` with the decay ``Diag(exp(gk_t))``.

    Keywords as in :func:`simple_gla`.

    Examples
    --------
    The loop and the library compute the same function:

    >>> import fastweights
    >>> from fastweights.testing import naive, random_call, relative_rms
    >>> call = random_call("kda", length=9)
    >>> o_loop, s_loop = call.run(naive.kda, output_final_state=True)
    >>> o_lib, s_lib = call.run(fastweights.kda, output_final_state=True)
    >>> relative_rms(o_lib, o_loop) < 1e-12, relative_rms(s_lib, s_loop) < 1e-12
    (True, True)
    """
    return _scan(q, k, v, gk=gk, beta=beta, **common)


def delta_product(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    *,
    g: Any = None,
    num_householder: int,
    **common: Any,
) -> tuple[np.ndarray, Any]:
    """DeltaProduct: per token, decay once by ``exp(g_t)`` (if given), then ``n`` delta steps.

    ``k``, ``v``, ``beta`` have ``T * num_householder`` rows (rows ``t*n .. t*n+n-1`` belong to
    token ``t``); ``q``, ``g`` and ``o`` have ``T`` rows; ``cu_seqlens`` counts tokens.
    Keywords as in :func:`simple_gla`.

    Examples
    --------
    The loop and the library compute the same function:

    >>> import fastweights
    >>> from fastweights.testing import naive, random_call, relative_rms
    >>> call = random_call("delta_product", length=9)
    >>> o_loop, s_loop = call.run(naive.delta_product, output_final_state=True)
    >>> o_lib, s_lib = call.run(fastweights.delta_product, output_final_state=True)
    >>> relative_rms(o_lib, o_loop) < 1e-12, relative_rms(s_lib, s_loop) < 1e-12
    (True, True)
    """
    return _scan(q, k, v, g=g, beta=beta, num_householder=num_householder, **common)


def dplr(
    q: Any,
    k: Any,
    v: Any,
    a: Any,
    b: Any,
    gk: Any,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
) -> tuple[np.ndarray, Any]:
    """``S_t = Diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``, ``o_t = S_t^T q~_t``.

    A ``-inf`` entry of ``gk`` zeroes that row of the decayed part exactly; ``gk`` None is no
    decay (``iplr``).
    """
    v_dtype = np.asarray(v).dtype
    q, k, v, a, b = (np.asarray(x, dtype=np.float64) for x in (q, k, v, a, b))
    batch, length, heads, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (dk**-0.5 if scale is None else scale)
    q, k = np.repeat(q, hv // heads, axis=2), np.repeat(k, hv // heads, axis=2)
    gk = None if gk is None else np.asarray(gk, dtype=np.float64)
    segments = _segments(batch, length, cu_seqlens)
    states = np.zeros((len(segments), hv, dk, dv))
    if initial_state is not None:
        states[...] = np.asarray(initial_state, dtype=np.float64)
    o = np.zeros((batch, length, hv, dv))
    for i, (row, start, end) in enumerate(segments):
        S = states[i]
        for t in range(start, end):
            read = np.einsum("hk,hkv->hv", a[row, t], S)
            decayed = S
            if gk is not None:
                g = gk[row, t][:, :, None]
                decayed = np.where(g == -np.inf, 0.0, np.exp(g) * S)
            S = decayed + b[row, t][:, :, None] * read[:, None, :]
            S = S + k[row, t][:, :, None] * v[row, t][:, None, :]
            o[row, t] = np.einsum("hk,hkv->hv", q[row, t], S)
        states[i] = S
    return o.astype(v_dtype), (states if output_final_state else None)


def iplr(q: Any, k: Any, v: Any, a: Any, b: Any, **common: Any) -> tuple[np.ndarray, Any]:
    """:func:`dplr` without decay."""
    return dplr(q, k, v, a, b, None, **common)


def rwkv7(q: Any, k: Any, v: Any, w: Any, kk: Any, a: Any, **common: Any) -> tuple[np.ndarray, Any]:
    """RWKV-7: :func:`dplr` with ``gk = w``, ``a = -kk``, ``b = kk * a``."""
    kk = np.asarray(kk, dtype=np.float64)
    return dplr(q, k, v, -kk, kk * np.asarray(a, dtype=np.float64), w, **common)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_CG_EPS = 1e-5


def _cg(a: np.ndarray, b: np.ndarray, iterations: int) -> np.ndarray:
    """fla's conjugate gradient for ``a x = b``, per leading index (``a [..., K, K]``).

    Starts at ``x = 0`` and runs exactly ``iterations`` steps, with ``1e-5`` added to the
    denominators of both the step length and the direction update; no early stop.
    """
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = np.sum(r * r, axis=-1)
    for _ in range(iterations):
        ap = np.einsum("...ij,...j->...i", a, p)
        alpha = rr / (np.sum(p * ap, axis=-1) + _CG_EPS)
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * ap
        rr_new = np.sum(r * r, axis=-1)
        p = r + (rr_new / (rr + _CG_EPS))[..., None] * p
        rr = rr_new
    return x


def _cholesky_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``a x = b`` per leading index for symmetric positive definite ``a``.

    ``a = L L^T`` (raises :class:`numpy.linalg.LinAlgError` when ``a`` is finite but not
    positive definite), then ``L y = b`` and ``L^T x = y``; a matrix with a NaN or Inf gives
    a NaN solution (non-finite values propagate, they do not raise).
    """
    finite = np.all(np.isfinite(a), axis=(-2, -1))
    a = np.where(finite[..., None, None], a, np.eye(a.shape[-1]))  # NaN/Inf: a NaN solution
    low = np.linalg.cholesky(a)
    y = np.linalg.solve(low, b[..., None])
    x = np.linalg.solve(np.swapaxes(low, -1, -2), y)[..., 0]
    return np.where(finite[..., None], x, np.nan)


def mesa_net(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    lamb: Any,
    *,
    solver: str = "exact",
    max_cg_iterations: int = 30,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
) -> tuple[np.ndarray, Any]:
    """MesaNet: the read-out of a discounted ridge regression solved at every token.

    Per value head, with ``q~_t = scale * q_t``::

        H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T          [K, K]
        G_t = exp(g_t) G_{t-1} + beta_t k_t v_t^T          [K, V]
        (H_t + Diag(lamb)) x_t = q~_t
        o_t = G_t^T x_t

    ``solver="exact"`` solves with the Cholesky factor of ``H_t + Diag(lamb)``;
    ``solver="cg"`` runs fla's conjugate gradient: ``x = 0``, ``r = p = q~_t``, then exactly
    ``max_cg_iterations`` times ``alpha = r.r / (p.Ap + 1e-5)``, ``x += alpha p``,
    ``r -= alpha Ap``, ``p = r + (r_new.r_new / (r_old.r_old + 1e-5)) p`` (the ``1e-5`` terms
    make it stall about 1e-4 away from the exact solve). A ``-inf`` gate resets both states.

    Parameters
    ----------
    q, k : array_like
        ``[B, T, H, K]``.
    v : array_like
        ``[B, T, HV, V]``.
    g, beta : array_like
        ``[B, T, HV]``: log decay and write strength.
    lamb : array_like
        ``[HV, K]``, positive: the ridge penalty.
    solver : {"exact", "cg"}
    max_cg_iterations : int
        Steps of ``"cg"``.
    scale, output_final_state, cu_seqlens, use_qk_l2norm
        As in :func:`linear_attn`.
    initial_state : tuple of array_like, optional
        ``(H [N, HV, K, K], G [N, HV, K, V])``.

    Returns
    -------
    o : numpy.ndarray
        ``[B, T, HV, V]``.
    final_state : tuple of numpy.ndarray or None
        ``(H [N, HV, K, K], G [N, HV, K, V])``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.testing import naive
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 5, 2, 8))
    >>> v = rng.standard_normal((1, 5, 2, 4))
    >>> g, beta = np.full((1, 5, 2), -0.1), np.full((1, 5, 2), 0.5)
    >>> lamb = np.ones((2, 8))
    >>> o, (h, gs) = naive.mesa_net(
    ...     q, k, v, g, beta, lamb, output_final_state=True, use_qk_l2norm=True
    ... )
    >>> o.shape, h.shape, gs.shape
    ((1, 5, 2, 4), (1, 2, 8, 8), (1, 2, 8, 4))
    """
    if solver not in ("exact", "cg"):
        raise ValueError(f"solver must be 'exact' or 'cg', not {solver!r}")
    v_dtype = np.asarray(v).dtype
    q, k, v, g, beta, lamb = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g, beta, lamb))
    batch, length, heads, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (dk**-0.5 if scale is None else scale)
    q, k = np.repeat(q, hv // heads, axis=2), np.repeat(k, hv // heads, axis=2)
    ridge = lamb[:, :, None] * np.eye(dk)  # Diag(lamb) per head, [HV, K, K]
    segments = _segments(batch, length, cu_seqlens)
    hs = np.zeros((len(segments), hv, dk, dk))
    gs = np.zeros((len(segments), hv, dk, dv))
    if initial_state is not None:
        hs[...] = np.asarray(initial_state[0], dtype=np.float64)
        gs[...] = np.asarray(initial_state[1], dtype=np.float64)
    o = np.zeros((batch, length, hv, dv))
    for i, (row, start, end) in enumerate(segments):
        H, G = hs[i], gs[i]
        for t in range(start, end):
            decay = g[row, t][:, None, None]
            H = np.where(decay == -np.inf, 0.0, np.exp(decay) * H)
            G = np.where(decay == -np.inf, 0.0, np.exp(decay) * G)
            kb = beta[row, t][:, None] * k[row, t]
            H = H + kb[:, :, None] * k[row, t][:, None, :]
            G = G + kb[:, :, None] * v[row, t][:, None, :]
            if solver == "exact":
                x = _cholesky_solve(H + ridge, q[row, t])
            else:
                x = _cg(H + ridge, q[row, t], max_cg_iterations)
            o[row, t] = np.einsum("hkv,hk->hv", G, x)
        hs[i], gs[i] = H, G
    return o.astype(v_dtype, copy=False), ((hs, gs) if output_final_state else None)


def recurrent_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    R_q: Any,
    R_k: Any,
    R_v: Any,
    r_beta: Any,
    *,
    scale: float = 1.0,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
) -> tuple[np.ndarray, Any]:
    """The Recurrent DeltaNet (Irie et al., 2021): the delta rule fed its own last output.

    Per head, with ``o_0 = 0`` (or the given one)::

        h     = tanh(o_{t-1})
        qh    = softmax(q_t + R_q h)             (softmax over K)
        kh    = softmax(k_t + R_k h)
        vh    = v_t + R_v h
        b     = sigmoid(beta_t + r_beta . h)
        S_t   = S_{t-1} + b kh (vh - S_{t-1}^T kh)^T
        o_t   = scale * S_t^T qh

    Parameters
    ----------
    q, k : array_like
        ``[B, T, H, K]``.
    v : array_like
        ``[B, T, H, V]``.
    beta : array_like
        ``[B, T, H]``, logits (the sigmoid is applied here).
    R_q, R_k : array_like
        ``[H, K, V]``.
    R_v : array_like
        ``[H, V, V]`` (``(R_v h)_i = sum_j R_v[i, j] h_j``).
    r_beta : array_like
        ``[H, V]``.
    scale : float
        Multiplies the read-out (1.0: ``qh`` is a softmax).
    initial_state : tuple of array_like, optional
        ``(S [N, H, K, V], o [N, H, V])``: the state and the last output.
    output_final_state, cu_seqlens
        As in :func:`linear_attn`.

    Returns
    -------
    o : numpy.ndarray
        ``[B, T, H, V]``.
    final_state : tuple of numpy.ndarray or None
        ``(S [N, H, K, V], o [N, H, V])``; ``o`` is the sequence's last output (the given
        one, or zero, for an empty sequence).

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.testing import naive
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 5, 2, 8))
    >>> v, beta = rng.standard_normal((1, 5, 2, 4)), rng.standard_normal((1, 5, 2))
    >>> R_q, R_k = 0.1 * rng.standard_normal((2, 2, 8, 4))
    >>> R_v, r_beta = 0.1 * rng.standard_normal((2, 4, 4)), np.zeros((2, 4))
    >>> o, (s, last) = naive.recurrent_delta_rule(
    ...     q, k, v, beta, R_q, R_k, R_v, r_beta, output_final_state=True
    ... )
    >>> o.shape, s.shape, bool(np.all(last == o[:, -1]))
    ((1, 5, 2, 4), (1, 2, 8, 4), True)
    """
    v_dtype = np.asarray(v).dtype
    q, k, v, beta, R_q, R_k, R_v, r_beta = (
        np.asarray(x, dtype=np.float64) for x in (q, k, v, beta, R_q, R_k, R_v, r_beta)
    )
    batch, length, heads, dk = q.shape
    dv = v.shape[3]
    segments = _segments(batch, length, cu_seqlens)
    states = np.zeros((len(segments), heads, dk, dv))
    lasts = np.zeros((len(segments), heads, dv))
    if initial_state is not None:
        states[...] = np.asarray(initial_state[0], dtype=np.float64)
        lasts[...] = np.asarray(initial_state[1], dtype=np.float64)
    o = np.zeros((batch, length, heads, dv))
    for i, (row, start, end) in enumerate(segments):
        S, last = states[i], lasts[i]
        for t in range(start, end):
            h = np.tanh(last)
            qh = _softmax(q[row, t] + np.einsum("hkv,hv->hk", R_q, h))
            kh = _softmax(k[row, t] + np.einsum("hkv,hv->hk", R_k, h))
            vh = v[row, t] + np.einsum("hij,hj->hi", R_v, h)
            b = _sigmoid(beta[row, t] + np.sum(r_beta * h, axis=-1))
            err = vh - np.einsum("hkv,hk->hv", S, kh)
            S = S + kh[:, :, None] * (b[:, None] * err)[:, None, :]
            last = scale * np.einsum("hkv,hk->hv", S, qh)
            o[row, t] = last
        states[i], lasts[i] = S, last
    return o.astype(v_dtype, copy=False), ((states, lasts) if output_final_state else None)


def srwm(
    x: Any,
    W0: Any,
    *,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
) -> tuple[np.ndarray, Any]:
    """The self-referential weight matrix (Irie et al., 2022).

    Per head, ``W [D, V + 2D + 4]`` maps ``phi(x) = softmax(x)`` (over ``D``) to its output,
    key, query and four learning-rate logits, and rewrites itself::

        [y_t, k_t, q_t, beta_t] = W_{t-1}^T phi(x_t)        (split V, D, D, 4)
        v_t    = W_{t-1}^T phi(q_t)
        vbar_t = W_{t-1}^T phi(k_t)
        lr_t   = sigmoid(beta_t), entry j repeated over block j's columns (V, D, D, 4)
        W_t    = W_{t-1} + phi(k_t) (lr_t * (v_t - vbar_t))^T
        o_t    = y_t                                        (read with W_{t-1})

    Parameters
    ----------
    x : array_like
        ``[B, T, H, D]``.
    W0 : array_like
        ``[H, D, V + 2D + 4]``: every sequence's initial weight.
    initial_state : array_like, optional
        ``[N, H, D, V + 2D + 4]``; replaces ``W0`` for each sequence.
    output_final_state, cu_seqlens
        As in :func:`linear_attn`.

    Returns
    -------
    o : numpy.ndarray
        ``[B, T, H, V]``, in ``x``'s dtype.
    final_state : numpy.ndarray or None
        ``[N, H, D, V + 2D + 4]``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.testing import naive
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 5, 2, 3))
    >>> W0 = rng.standard_normal((2, 3, 4 + 2 * 3 + 4))
    >>> o, w = naive.srwm(x, W0, output_final_state=True)
    >>> o.shape, w.shape
    ((1, 5, 2, 4), (1, 2, 3, 14))
    """
    x_dtype = np.asarray(x).dtype
    x = np.asarray(x, dtype=np.float64)
    W0 = np.asarray(W0, dtype=np.float64)
    batch, length, heads, d = x.shape
    width = W0.shape[-1]
    dv = width - 2 * d - 4
    blocks = [dv, d, d, 4]
    segments = _segments(batch, length, cu_seqlens)
    weights = np.zeros((len(segments), heads, d, width))
    weights[...] = W0 if initial_state is None else np.asarray(initial_state, dtype=np.float64)
    o = np.zeros((batch, length, heads, dv))
    for i, (row, start, end) in enumerate(segments):
        W = weights[i]
        for t in range(start, end):
            out = np.einsum("hdm,hd->hm", W, _softmax(x[row, t]))
            y, kt, qt, bt = np.split(out, np.cumsum(blocks)[:-1], axis=-1)
            pk = _softmax(kt)
            vt = np.einsum("hdm,hd->hm", W, _softmax(qt))
            vbar = np.einsum("hdm,hd->hm", W, pk)
            lr = np.repeat(_sigmoid(bt), blocks, axis=-1)
            W = W + pk[:, :, None] * (lr * (vt - vbar))[:, None, :]
            o[row, t] = y
        weights[i] = W
    return o.astype(x_dtype, copy=False), (weights if output_final_state else None)
