"""The two solvers of ``(H_t + Diag(lamb)) x_t = q~_t``, batched over any leading axes."""

from __future__ import annotations

from types import ModuleType
from typing import Any

CG_EPS = 1e-5
"""fla's conjugate gradient adds this to both denominators (RULES2.md section 3)."""


def exact(xp: ModuleType, A: Any, b: Any) -> Any:
    """``x`` with ``A x = b`` for symmetric positive definite ``A [..., K, K]``, ``b [..., K]``.

    The Array API's ``linalg.solve`` (LU with pivoting, exact to rounding like the Cholesky
    solve of the kernels); the standard has no triangular solve to pair with ``cholesky``.
    """
    return xp.linalg.solve(A, b[..., None])[..., 0]


def cg(xp: ModuleType, A: Any, b: Any, iterations: int) -> Any:
    """fla's conjugate gradient: ``x = 0``, ``r = p = b``, exactly ``iterations`` steps of
    ``alpha = r.r / (p.Ap + 1e-5)``, ``x += alpha p``, ``r -= alpha Ap``,
    ``p = r + (r'.r' / (r.r + 1e-5)) p``; no early stop. The ``1e-5`` terms make it stall
    about 1e-4 away from the exact solve; they are kept so that results match fla."""
    x = xp.zeros_like(b)
    r = b
    p = b
    rr = xp.sum(r * r, axis=-1)
    for _ in range(iterations):
        ap = xp.matmul(A, p[..., None])[..., 0]
        alpha = rr / (xp.sum(p * ap, axis=-1) + CG_EPS)
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * ap
        rr_new = xp.sum(r * r, axis=-1)
        p = r + (rr_new / (rr + CG_EPS))[..., None] * p
        rr = rr_new
    return x


def solve(xp: ModuleType, A: Any, b: Any, solver: str, iterations: int) -> Any:
    return exact(xp, A, b) if solver == "exact" else cg(xp, A, b, iterations)
