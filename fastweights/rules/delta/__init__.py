"""The first wave: every rule an instance of one gated delta rule (SPEC.md).

Each op is the general rule with parts switched off::

    S' = Diag(alpha_t) S_{t-1}                        # decay (none, per head or per key channel)
    S_t = S' + k_t (beta_t * (v_t - erase * S'^T k_t))^T
    o_t = S_t^T (scale q_t)

``erase = 0, beta = 1`` gives the Hebbian rules (``linear_attn``, ``simple_gla``, ``gla``),
``erase = 1`` the delta rules. Forms: :mod:`.recurrent` (the definition) and :mod:`.chunk`
(the WY/UT chunk form; the parallel form is its one-chunk case). The descriptions are in
:mod:`.rules`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._layout import cotangents, prepare, raw_grads
from .chunk import chunk
from .recurrent import recurrent
from .rules import RULES

if TYPE_CHECKING:
    from ..._validate import Call

__all__ = ["RULES", "auto_form", "form_unavailable", "run", "vjp"]


def form_unavailable(call: Call, form: str) -> str | None:
    """Why this call has no ``form`` beyond the rule's own ``no_form`` (None: it has it)."""
    if form == "recurrent":
        return None
    if call.beta_per_value:
        return "a per-value beta has no WY (UT-transform) representation; use form='recurrent'"
    if form == "parallel" and call.cu_seqlens is not None:
        return "packed sequences (cu_seqlens) need form='chunk' or 'recurrent'"
    return None


def auto_form(call: Call) -> tuple[str, str]:
    """The form ``"auto"`` picks on the reference backend, and why.

    The chunk form (matrix products over all chunks at once) wherever the call has it, except
    for per-key-channel decays (``gla``, ``kda``): their elementwise diagonal blocks make the
    chunk form no faster than the recurrent one on NumPy (asv on 832615d, 2-core Xeon, T=8192,
    H=4, K=V=128: gla 8.3k vs 8.1k tokens/s, kda 4.5k vs 7.6k; K=V=64: gla 16k vs 26k, kda 8.7k
    vs 24k; docs/forms.md has the same comparison from the latest run).
    """
    unavailable = form_unavailable(call, "chunk")
    if unavailable:
        return "recurrent", f"no chunk form for this call: {unavailable}"
    if call.spec.gate == "gk":
        return "recurrent", "per-key-channel decays make the chunk form slower on NumPy"
    if call.T * call.num_householder <= 1:
        return "recurrent", "one step"
    return "chunk", "matrix products over every chunk at once"


def run(call: Call, form: str) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call in ``form``."""
    problem, finish = prepare(call)
    if form == "recurrent":
        o, state = recurrent(problem)
    else:
        o, state = chunk(problem, call.chunk_size, one_chunk=form == "parallel")
    return finish(o, state)


def vjp(
    call: Call, form: str, do: Any, dstate: Any, *, sweeps: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final_state * dstate)`` with respect to the call's raw
    arguments (``fastweights.vjp``), by the reverse sweep of ``form``: recurrent
    (:mod:`.recurrent_vjp`) or chunkwise (:mod:`.chunk_vjp`; ``"parallel"`` is its one-chunk
    case). ``sweeps`` replaces a form's problem-level sweep (a backend's kernels)."""
    from .recurrent_vjp import recurrent_vjp

    problem, _ = prepare(call)
    o_raw = None
    if call.normalize:
        o_raw = recurrent(problem)[0] if form == "recurrent" else chunk(problem, call.chunk_size)[0]
    do_p, ds_p = cotangents(call, problem, do, dstate, o_raw)
    chosen = dict(sweeps or {})
    if form == "recurrent":
        g = chosen.get(form, recurrent_vjp)(problem, do_p, ds_p, call.chunk_size)
    else:
        from .chunk_vjp import chunk_vjp

        g = chosen.get(form, chunk_vjp)(
            problem, do_p, ds_p, call.chunk_size, one_chunk=form == "parallel"
        )
    return raw_grads(call, g)
