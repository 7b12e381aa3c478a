"""The first-wave ops as instances of one general update rule.

Every op is the gated delta rule of SPEC.md with some parts switched off::

    S' = Diag(alpha_t) S_{t-1}                        # decay (none, per head or per key channel)
    S_t = S' + k_t (beta_t * (v_t - erase * S'^T k_t))^T
    o_t = S_t^T (scale q_t)

``erase = 0, beta = 1`` gives the Hebbian family (``linear_attn``, ``simple_gla``, ``gla``),
``erase = 1`` the delta family. This table is what validation, the registry and every backend
read to know an op's arguments and forms.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMS = ("recurrent", "chunk", "parallel")
"""Every form an op can have; ``"auto"`` lets the backend choose among them."""


@dataclass(frozen=True)
class OpSpec:
    """What distinguishes one op from the general rule."""

    name: str
    gate: str | None
    """Name of the log-decay argument: ``"g"`` (per head), ``"gk"`` (per key channel) or None."""
    gate_optional: bool
    """The gate may be None (DeltaProduct's ``g``)."""
    erase: bool
    """Delta family: the write corrects the state's prediction ``S'^T k``."""
    forms: tuple[str, ...]
    """Forms the op has at all (for any call)."""

    @property
    def has_beta(self) -> bool:
        return self.erase


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("linear_attn", None, False, False, FORMS),
        OpSpec("simple_gla", "g", False, False, FORMS),
        OpSpec("gla", "gk", False, False, ("recurrent", "chunk")),
        OpSpec("delta_rule", None, False, True, FORMS),
        OpSpec("gated_delta_rule", "g", False, True, FORMS),
        OpSpec("kda", "gk", False, True, ("recurrent", "chunk")),
        OpSpec("delta_product", "g", True, True, ("recurrent", "chunk")),
    )
}
"""The ops a backend implements. ``retention`` is ``simple_gla`` with a fixed gate."""

_NO_PARALLEL = {
    "gla": "a per-key-channel decay has no attention-like parallel form",
    "kda": "a per-key-channel decay has no attention-like parallel form",
    "delta_product": "its several delta steps per token have no parallel form",
}


def form_unavailable(op: str, form: str, *, packed: bool, beta_per_value: bool) -> str | None:
    """Why ``op`` has no ``form`` for such a call, or None when it has it."""
    if form == "recurrent":
        return None
    if form == "parallel" and op in _NO_PARALLEL:
        return _NO_PARALLEL[op]
    if beta_per_value:
        return "a per-value beta has no WY (UT-transform) representation; use form='recurrent'"
    if form == "parallel" and packed:
        return "packed sequences (cu_seqlens) need form='chunk' or 'recurrent'"
    return None
