"""fastweights-numpy-scan: an example fastweights backend, the recurrent scan in pure NumPy.

It runs ``simple_gla`` (and so ``retention``, which fastweights calls as ``simple_gla``) and
``gated_delta_rule`` in the recurrent form, and their decoding steps, on float32 and float64
NumPy arrays. Everything else it leaves to the other backends. Per (sequence, value head),
with ``q`` already scaled::

    S' = exp(g_t) S_{t-1}
    u_t = v_t                          (simple_gla)
    u_t = beta_t * (v_t - S'^T k_t)    (gated_delta_rule)
    S_t = S' + k_t u_t^T
    o_t = S_t^T q_t
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import numpy as np

# The toolkit of fastweights.backends: a backend imports nothing else from fastweights.
from fastweights.backends import L2NORM_EPS, Call, gather_rows, write_rows


class NumpyScanBackend:
    """The attributes and methods of ``fastweights.backends.Backend``."""

    name = "numpy_scan"
    # Above `reference` (0), below `numba` (10): installing this plugin takes no NumPy call
    # from the compiled numba kernels; it is chosen automatically only where numba is absent.
    priority = 5
    ops: ClassVar[dict[str, tuple[str, ...]]] = {
        "simple_gla": ("recurrent",),
        "gated_delta_rule": ("recurrent",),
    }
    step_ops = ("simple_gla", "gated_delta_rule")
    # Optional, for people and tools reading the table; `rejects` is what declines a call.
    dtypes = "float32, float64"

    def unavailable(self) -> str | None:
        # NumPy comes with fastweights: nothing can be missing. A backend with an optional
        # dependency checks for it here cheaply (importlib.util.find_spec), without importing.
        return None

    def rejects(self, call: Call) -> str | None:
        # Only calls of the ops and forms listed above get here. Validation has checked that
        # the arrays share one namespace and device (not which) and have real floating dtypes.
        # `call.inputs` holds the op's arrays after q, k, v by name: g (and beta).
        states = (call.initial_state, call.state_pool)
        for x in (call.q, call.k, call.v, *call.inputs.values(), *states):
            if x is None:
                continue
            if not isinstance(x, np.ndarray):
                return f"it runs NumPy arrays only, got {type(x).__module__}.{type(x).__name__}"
            if x.dtype not in (np.float32, np.float64):
                return f"it runs float32 and float64 arrays only, got {x.dtype}"
        return None

    def plan(self, call: Call) -> dict[str, Any]:
        # Optional: what fastweights.plan and `python -m fastweights plan` report.
        return {"form": "recurrent", "why": "the NumPy scan runs the recurrent form only"}

    def run(self, call: Call) -> tuple[Any, Any]:
        if call.initial_state is None:
            state = np.zeros((call.N, call.HV, call.K, call.V), dtype=call.dtype)
        else:
            state = call.initial_state.astype(call.dtype)  # a copy: the scan updates it
        o = _scan_call(call, state)
        return o, (state if call.output_final_state else None)

    def step(self, call: Call) -> tuple[Any, Any]:
        # A step is the scan of one token (validation gives q, k, v, g, beta a T axis of 1)
        # on the pool rows `state_indices` (None: row i for batch row i), written back in place.
        rows = gather_rows(call.xp, call.state_pool, call.state_indices)
        state = rows.astype(call.dtype)  # a copy, in the compute dtype
        o = _scan_call(call, state)
        pool = write_rows(call.xp, call.state_pool, call.state_indices, state)  # pool's dtype
        return o[:, 0], pool


def _scan_call(call: Call, state: np.ndarray) -> np.ndarray:
    """Output ``[B, T, HV, V]`` in ``v``'s dtype; ``state [N, HV, K, V]`` is advanced in place."""
    dt = call.dtype
    # Value head j reads query/key head j // G (grouped value heads, HV = G * H).
    heads = np.arange(call.HV) // (call.HV // call.H)
    q = call.q[:, :, heads].astype(dt, copy=False)  # indexing with `heads` copies
    k = call.k[:, :, heads].astype(dt, copy=False)
    if call.use_qk_l2norm:
        q = q / np.sqrt(np.sum(q * q, axis=-1, keepdims=True) + L2NORM_EPS)
        k = k / np.sqrt(np.sum(k * k, axis=-1, keepdims=True) + L2NORM_EPS)
    q = q * call.scale
    v = call.v.astype(dt, copy=False)  # only read
    decay = np.exp(call.g.astype(dt))  # g = -inf gives 0: a reset to the zero state
    beta = None if call.beta is None else call.beta.astype(dt, copy=False)
    o = np.empty((call.B, call.T, call.HV, call.V), dtype=dt)
    if call.cu_seqlens is None:
        _scan(q, k, v, decay, beta, state, o)
    else:
        # Packed sequences (B == 1): sequence i is tokens cu[i]:cu[i+1] and owns state row i.
        # An empty sequence runs no step and passes its initial state through.
        for i, (a, b) in enumerate(itertools.pairwise(call.cu_seqlens.tolist())):
            seq = slice(a, b)
            bseq = None if beta is None else beta[:, seq]
            _scan(q[:, seq], k[:, seq], v[:, seq], decay[:, seq], bseq, state[i : i + 1], o[:, seq])
    return o.astype(call.v.dtype, copy=False)


def _scan(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    decay: np.ndarray,
    beta: np.ndarray | None,
    S: np.ndarray,
    o: np.ndarray,
) -> None:
    """The recurrence over axis 1 (tokens) of ``[n, T, HV, ...]`` inputs.

    ``S [n, HV, K, V]`` is updated and ``o [n, T, HV, V]`` written in place. ``beta is None``
    is the Hebbian write of ``simple_gla``; otherwise the delta-rule correction, with ``beta``
    per head ``[n, T, HV]`` or per value channel ``[n, T, HV, V]``.
    """
    for t in range(q.shape[1]):
        S *= decay[:, t, :, None, None]
        u = v[:, t]  # [n, HV, V]
        if beta is not None:
            b = beta[:, t] if beta.ndim == 4 else beta[:, t, :, None]
            u = b * (u - np.einsum("nhk,nhkv->nhv", k[:, t], S))
        S += k[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = np.einsum("nhk,nhkv->nhv", q[:, t], S)


backend = NumpyScanBackend()
