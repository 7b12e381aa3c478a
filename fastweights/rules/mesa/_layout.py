"""A validated ``mesa_net`` call as the head-major arrays its forms work on, and back."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._layout import _heads_first, _pad, _pad_index, l2norm, tokens_first

if TYPE_CHECKING:
    from ..._validate import Call


@dataclass
class Problem:
    """MesaNet's inputs, head-major, in the compute dtype.

    ``q, k: [N, HV, T, K]`` (``q`` normalised and scaled, grouped heads expanded),
    ``v: [N, HV, T, V]``, ``g, beta: [N, HV, T]``, ``ridge: [HV, K, K]`` (``Diag(lamb)``),
    ``H: [N, HV, K, K]``, ``G: [N, HV, K, V]``. Packed sequences are a zero-padded batch: a
    padded step has ``k = v = beta = g = 0`` and leaves both states unchanged.
    """

    xp: ModuleType
    q: Any
    k: Any
    v: Any
    g: Any
    beta: Any
    ridge: Any
    H: Any
    G: Any
    solver: str
    iterations: int


def prepare(call: Call) -> tuple[Problem, Any]:
    """The problem of ``call`` and ``finish(o, (H, G)) -> (o, final_state)`` in the caller's
    layout (``o: [N, HV, T', V]`` with ``T'`` the padded token count)."""
    xp, dt, dev = call.xp, call.dtype, call.device
    group = call.HV // call.H
    q, k, v, g, beta, lamb = (
        xp.astype(x, dt) for x in (call.q, call.k, call.v, call.g, call.beta, call.lamb)
    )
    if call.use_qk_l2norm:
        q, k = l2norm(xp, q), l2norm(xp, k)
    q = q * call.scale
    t_max = call.T
    if call.cu_seqlens is not None:
        idx, t_max = _pad_index(call.cu_seqlens, call.T, 1)
        q, k, v, g, beta = (_pad(xp, x, idx, dev) for x in (q, k, v, g, beta))
    if group > 1:
        q, k = xp.repeat(q, group, axis=2), xp.repeat(k, group, axis=2)
    q, k, v = (_heads_first(xp, x) for x in (q, k, v))
    g, beta = (xp.permute_dims(x, (0, 2, 1)) for x in (g, beta))
    eye = xp.eye(call.K, dtype=dt, device=dev)
    ridge = lamb[:, :, None] * eye
    if call.initial_state is None:
        H = xp.zeros((call.N, call.HV, call.K, call.K), dtype=dt, device=dev)
        G = xp.zeros((call.N, call.HV, call.K, call.V), dtype=dt, device=dev)
    else:
        H, G = (xp.astype(x, dt) for x in call.initial_state)
    solver, iterations = call.options["solver"], call.options["max_cg_iterations"]

    def finish(o: Any, final: Any) -> tuple[Any, Any]:
        o = tokens_first(xp, o, call.cu_seqlens, t_max, dev)
        o = xp.astype(o, call.v.dtype)
        return o, (tuple(final) if call.output_final_state else None)

    return Problem(xp, q, k, v, g, beta, ridge, H, G, solver, iterations), finish
