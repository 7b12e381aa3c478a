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
from typing import TYPE_CHECKING, Any

from ._ops import RULES
from ._public import define
from ._registry import select
from ._validate import validate_step

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


def _step(op: str, arguments: dict[str, Any]) -> tuple[Any, Any]:
    """Validate and run one decoding step of ``op`` given by argument name."""
    args = dict(arguments)
    backend = args.pop("backend")
    call = validate_step(op, **args)
    return select(call, backend).step(call)


for _rule in RULES.values():
    globals()[_rule.name] = define(_rule, _step, _COMMON, step=True)

__all__ = list(RULES)

if TYPE_CHECKING:  # the steps are generated from their rules' descriptions (see _public)

    def __getattr__(name: str) -> Callable[..., tuple[Any, Any]]:
        raise AttributeError(name)
