"""MesaNet's gradient: the reverse sweep of :func:`.recurrent.recurrent`, solves included.

One step, per (sequence, value head), ``q`` already normalised and scaled::

    H_t = a_t H_{t-1} + beta_t k_t k_t^T    G_t = a_t G_{t-1} + beta_t k_t v_t^T    (a = exp(g))
    A_t = H_t + Diag(lamb);   x_t = solve(A_t, q_t);   o_t = G_t^T x_t

and its adjoint, from ``Hbar, Gbar`` (the cotangents of ``H_t, G_t``; at the last step those
of the final state)::

    Gbar += x obar^T;   xbar = G_t obar
    exact:  qbar = A_t^-T xbar;   Abar = -qbar x^T           (the solve's adjoint)
    cg:     qbar, Abar by reverse mode through the fixed CG iterations (below)
    Hbar += Abar;   lambbar += diag(Abar)
    kbar = beta (Hbar + Hbar^T) k + beta Gbar v;   vbar = beta Gbar^T k
    betabar = k^T Hbar k + k^T Gbar v
    gbar = sum(Hbar * a H_{t-1}) + sum(Gbar * a G_{t-1});   Hbar, Gbar <- a Hbar, a Gbar

``Abar`` is the gradient with respect to every entry of ``A`` as the forward reads it (both
solvers use the whole matrix), so the gradient of ``H`` in ``initial_state`` is not
symmetrised: a finite difference of one entry of ``H_0`` measures exactly it. The symmetric
part is what a perturbation that keeps ``H_0`` symmetric sees.

``solver="cg"``: the gradient is that of the computed CG iterate, by exact reverse mode
through its ``max_cg_iterations`` steps (``1e-5`` terms included), not the implicit
exact-solve adjoint (which would differ from the finite differences of the ``"cg"`` forward by
about the CG's stall error, 1e-4). Each token's iterations are rerun in the backward sweep and
kept for that token only (``O(iterations K)``).

The chunk form's gradient is this recurrent sweep: both forms compute the same function (to
rounding), so one adjoint serves both. Memory: the states ``(H, G)`` at chunk boundaries
(``chunk_size`` steps) from one forward pass; each chunk's states are recomputed from its
boundary when the reverse sweep reaches it, never a state per token for the whole sequence,
and the decay is never divided out. A ``-inf`` gate resets both states (selected to 0): its
gradient is 0 and no cotangent flows through it to earlier steps.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from array_api_compat import device

from .._layout import cotangent_rows, qk_grads, tokens_first
from ..chunk import decay
from ._layout import Problem, prepare
from .solve import CG_EPS

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..._validate import Call


def _cg_trace(xp: ModuleType, A: Any, b: Any, iterations: int) -> tuple[Any, list[tuple]]:
    """:func:`.solve.cg` and what each iteration's adjoint needs."""
    x = xp.zeros_like(b)
    r = p = b
    rr = xp.sum(r * r, axis=-1)
    trace = []
    for _ in range(iterations):
        ap = xp.matmul(A, p[..., None])[..., 0]
        d = xp.sum(p * ap, axis=-1) + CG_EPS
        alpha = rr / d
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * ap
        rr_new = xp.sum(r * r, axis=-1)
        ratio = rr_new / (rr + CG_EPS)
        trace.append((p, ap, rr, d, alpha, r, rr_new, ratio))
        p = r + ratio[..., None] * p
        rr = rr_new
    return x, trace


def _cg_vjp(xp: ModuleType, A: Any, b: Any, trace: list[tuple], dx: Any) -> tuple[Any, Any]:
    """``(bbar, Abar)`` of ``x = cg(A, b)`` from ``xbar``, step by step in reverse."""
    dr = xp.zeros_like(dx)
    dp = xp.zeros_like(dx)  # cotangent of p_{i+1}
    drr = xp.zeros_like(dx[..., 0])  # cotangent of rr_{i+1}
    dA = xp.zeros_like(A)
    for p, ap, rr, d, alpha, r, rr_new, ratio in reversed(trace):
        # p_{i+1} = r_{i+1} + ratio_i p_i,  ratio_i = rr_{i+1} / (rr_i + eps)
        dr = dr + dp
        dratio = xp.sum(dp * p, axis=-1)
        dp = ratio[..., None] * dp
        drr = drr + dratio / (rr + CG_EPS)
        drr_old = -dratio * rr_new / (rr + CG_EPS) ** 2
        # rr_{i+1} = r_{i+1} . r_{i+1}
        dr = dr + 2 * drr[..., None] * r
        # r_{i+1} = r_i - alpha ap;  x_{i+1} = x_i + alpha p
        dalpha = xp.sum(dx * p, axis=-1) - xp.sum(dr * ap, axis=-1)
        dap = -alpha[..., None] * dr
        dp = dp + alpha[..., None] * dx
        # alpha = rr_i / d,  d = p . ap + eps
        drr = drr_old + dalpha / d
        dd = -dalpha * alpha / d
        dp = dp + dd[..., None] * ap
        dap = dap + dd[..., None] * p
        # ap = A p
        dA = dA + dap[..., :, None] * p[..., None, :]
        dp = dp + xp.matmul(xp.matrix_transpose(A), dap[..., None])[..., 0]
    # r_0 = p_0 = b,  rr_0 = b . b
    return dr + dp + 2 * drr[..., None] * b, dA


def _step(p: Problem, H: Any, G: Any, t: int) -> tuple[Any, Any, Any, Any]:
    """``(a H_{t-1}, a G_{t-1}, H_t, G_t)`` of step ``t`` (the forward's arithmetic)."""
    xp = p.xp
    g = p.g[:, :, t, None, None]
    kb = p.beta[:, :, t, None] * p.k[:, :, t, :]
    dH, dG = decay(xp, H, g), decay(xp, G, g)
    H_t = dH + kb[..., :, None] * p.k[:, :, t, None, :]
    G_t = dG + kb[..., :, None] * p.v[:, :, t, None, :]
    return dH, dG, H_t, G_t


def recurrent_vjp(p: Problem, do: Any, dstate: Any, chunk_size: int) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final * dstate)`` for :func:`.recurrent.recurrent`.

    ``do: [N, HV, T, V]`` head-major, ``dstate = (dH, dG)`` (arrays, zeros for none).
    Returns ``{"q", "k", "v", "g", "beta", "lamb", "H", "G"}`` shaped as the problem's
    ``q, k, v, g, beta``, ``lamb [HV, K]`` and the two states.
    """
    xp, T = p.xp, p.k.shape[2]
    zero = xp.zeros((), dtype=p.H.dtype, device=device(p.H))
    C = max(1, min(chunk_size, T))
    boundaries = [(p.H, p.G)]
    H, G = p.H, p.G
    for t in range(T):
        H, G = _step(p, H, G, t)[2:]
        if (t + 1) % C == 0 and t + 1 < T:
            boundaries.append((H, G))
    dH, dG = dstate
    rows: dict[str, list[Any]] = {"q": [], "k": [], "v": [], "g": [], "beta": []}
    dlamb = xp.zeros(p.ridge.shape[:2], dtype=p.H.dtype, device=device(p.H))
    for c in range((T - 1) // C, -1, -1):
        start, stop = c * C, min(T, (c + 1) * C)
        steps = []
        H, G = boundaries[c]
        for t in range(start, stop):
            steps.append(_step(p, H, G, t))
            H, G = steps[-1][2:]
        for t in range(stop - 1, start - 1, -1):
            dec_H, dec_G, H_t, G_t = steps[t - start]
            A = H_t + p.ridge
            q_t, k_t, v_t = p.q[:, :, t, :], p.k[:, :, t, :], p.v[:, :, t, :]
            do_t, beta_t = do[:, :, t, :], p.beta[:, :, t, None]
            if p.solver == "exact":
                x = xp.linalg.solve(A, q_t[..., None])[..., 0]
            else:
                x, trace = _cg_trace(xp, A, q_t, p.iterations)
            dG = dG + x[..., :, None] * do_t[..., None, :]
            dx = xp.matmul(G_t, do_t[..., None])[..., 0]
            if p.solver == "exact":
                dq = xp.linalg.solve(xp.matrix_transpose(A), dx[..., None])[..., 0]
                dA = -dq[..., :, None] * x[..., None, :]
            else:
                dq, dA = _cg_vjp(xp, A, q_t, trace, dx)
            rows["q"].append(dq)
            dH = dH + dA
            dlamb = dlamb + xp.sum(xp.linalg.diagonal(dA), axis=0)
            Hk = xp.matmul(dH, k_t[..., None])[..., 0]
            HTk = xp.matmul(k_t[..., None, :], dH)[..., 0, :]
            Gv = xp.matmul(dG, v_t[..., None])[..., 0]
            rows["k"].append(beta_t * (Hk + HTk + Gv))
            rows["v"].append(beta_t * xp.matmul(k_t[..., None, :], dG)[..., 0, :])
            rows["beta"].append(xp.sum(k_t * (Hk + Gv), axis=-1))
            reset = p.g[:, :, t] == -xp.inf
            dg = xp.sum(dH * dec_H, axis=(-2, -1)) + xp.sum(dG * dec_G, axis=(-2, -1))
            rows["g"].append(xp.where(reset, zero, dg))
            g = p.g[:, :, t, None, None]
            dH, dG = decay(xp, dH, g), decay(xp, dG, g)
    out: dict[str, Any] = {"lamb": dlamb, "H": dH, "G": dG}
    for name, parts in rows.items():
        like = getattr(p, name)
        out[name] = xp.stack(parts[::-1], axis=2) if parts else xp.zeros_like(like)
    return out


def vjp(
    call: Call,
    form: str,
    do: Any,
    dstate: Any,
    *,
    sweeps: Mapping[str, Callable[..., dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Gradients of ``L = sum(o * do) + sum(final * dstate)`` with respect to the raw
    arguments of a ``mesa_net`` call: ``q, k, v, g, beta, lamb``, and ``initial_state`` (the
    pair ``(dH_0, dG_0)``) when the call has one, in the compute dtype.

    ``do`` is like ``o`` (``[B, T, HV, V]``), ``dstate`` a pair like the final state or None.
    Both forms take the recurrent sweep (:func:`recurrent_vjp`) unless ``sweeps`` has one for
    ``form``.
    """
    xp, dt, dev = call.xp, call.dtype, call.device
    problem, _ = prepare(call)
    N, HV, K, V = call.N, call.HV, call.K, call.V
    do = cotangent_rows(xp, xp.astype(do, dt), call.cu_seqlens, call.T, 1, dev)
    t_max = do.shape[2]
    if dstate is None:
        dstate = (
            xp.zeros((N, HV, K, K), dtype=dt, device=dev),
            xp.zeros((N, HV, K, V), dtype=dt, device=dev),
        )
    else:
        dstate = tuple(xp.astype(x, dt) for x in dstate)
    sweep = (sweeps or {}).get(form, recurrent_vjp)
    d = sweep(problem, do, dstate, call.chunk_size)

    def back(x: Any) -> Any:  # [N, HV, T', X] -> the caller's [B, T, HV, X]
        return tokens_first(xp, x, call.cu_seqlens, t_max, dev)

    grads: dict[str, Any] = {"v": back(d["v"]), "lamb": d["lamb"]}
    for name in ("g", "beta"):
        grads[name] = back(d[name][..., None])[..., 0]
    grads["q"], grads["k"] = qk_grads(xp, call, back(d["q"]), back(d["k"]), None)
    if call.initial_state is not None:
        grads["initial_state"] = (d["H"], d["G"])
    return grads
