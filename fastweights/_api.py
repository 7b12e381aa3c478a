"""The public ops, sequence form: one function per rule, generated from its description.

Layout (API.md): ``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]`` with ``HV = G * H``, gates
``[B, T, HV]`` or ``[B, T, HV, K]``, state ``[N, HV, K, V]`` stored key-first; every op reads
after it writes, ``o_t = S_t^T (scale * q_t)``. Each function validates its call
(:func:`fastweights._validate.validate`), picks a backend and runs it.
"""

from __future__ import annotations

from typing import Any

from . import _serving
from ._ops import RULES
from ._public import define
from ._registry import select
from ._validate import validate

_COMMON = """\
    scale : float, optional
        Multiplies ``q``; default ``K ** -0.5``.
    initial_state : array, optional
        ``[N, HV, K, V]`` state before the first step (zeros if None); ``N = B``, or the
        number of packed sequences.
    output_final_state : bool
        Return the state after the last step (else None). A bool: arrays and other truthy
        objects raise ``TypeError``.
    state_pool : array, optional
        A decoding state pool ``[P, HV, K, V]`` (float32 or float64, its dtype kept) to run
        from and into: sequence ``i`` starts from ``state_pool[state_indices[i]]`` and its
        final state is written back there (in place; a new pool for JAX), as
        :mod:`fastweights.step` does for one token: prefill or verify several tokens per
        request in one call. The pool is returned in place of ``final_state``. Not with
        ``initial_state`` or ``output_final_state`` (``ValueError``); a read-only pool raises
        ``ValueError`` before any work.
    state_indices : integer array-like, optional
        ``[N]`` distinct rows of ``state_pool`` that sequences ``0 .. N-1`` use; default
        ``arange(N)`` (then ``P == N``). Only with ``state_pool``.
    output_state_snapshots : bool
        Also return the state after each token, ``[N, L + 1, HV, K, V]`` in the compute
        dtype (one such array per part of a pair state; ``L = T``, or the longest packed
        sequence): entry ``[i, j]`` is sequence
        ``i``'s state after ``j`` tokens, ``[i, 0]`` the state before the call, and a packed
        sequence shorter than ``L`` repeats its final state. Runs the recurrent form one token
        position at a time (one backend call per token), for the few tokens of a speculative
        verify; see :func:`fastweights.rollback`.
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
        float32. With ``state_pool``: the pool (updated in place; new for JAX).
    snapshots : array
        Only with ``output_state_snapshots=True``, then the result is
        ``(o, final_state, snapshots)``."""


def _sequence(op: str, arguments: dict[str, Any]) -> tuple[Any, Any]:
    """Validate and run a call of ``op`` given by argument name."""
    args = dict(arguments)
    backend = args.pop("backend")
    call = validate(op, **args)
    if call.pool is not None or call.snapshots:
        return _serving.run(call, backend)
    return select(call, backend).run(call)


for _rule in RULES.values():
    globals()[_rule.name] = define(_rule, _sequence, _COMMON, step=False)

__all__ = list(RULES)
