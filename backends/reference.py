"""The ``reference`` backend: the pure Array API math of :mod:`fastweights.rules`.

It accepts every namespace, dtype, op and form, and has the lowest priority: the automatic
choice takes it only when no faster backend accepts a call. It is the float64 oracle the
other backends are tested against. Each call goes to its rule's family package, which
prepares the problem and runs the form.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fastweights.backends import FAMILIES, OPS, Call, gather_rows, write_rows


class ReferenceBackend:
    name = "reference"
    priority = 0
    ops: ClassVar[dict[str, tuple[str, ...]]] = {op: rule.forms for op, rule in OPS.items()}
    step_ops = tuple(OPS)
    dtypes = "any real floating dtype of any Array API namespace (float64 if an input is wider)"

    def unavailable(self) -> str | None:
        return None

    def rejects(self, call: Call) -> str | None:
        return None

    def plan(self, call: Call) -> dict[str, Any]:
        """The form and chunk size this backend runs ``call`` with, and why."""
        if call.is_step:
            return {"form": "recurrent", "why": "one token is one recurrent step"}
        if call.form != "auto":
            form, why = call.form, "asked for"
        else:
            form, why = FAMILIES[call.spec.family].auto_form(call)
        plan: dict[str, Any] = {"form": form, "why": why}
        if form == "chunk":
            plan["chunk_size"] = call.chunk_size
        return plan

    def run(self, call: Call) -> tuple[Any, Any]:
        family = FAMILIES[call.spec.family]
        form = family.auto_form(call)[0] if call.form == "auto" else call.form
        return family.run(call, form)

    def vjp(self, call: Call, do: Any, dstate: Any) -> dict[str, Any]:
        """Gradients of the call's raw arguments (:func:`fastweights.vjp`), by the reverse
        sweep of ``call.form`` (``"auto"``: the form :meth:`run` picks)."""
        family = FAMILIES[call.spec.family]
        form = family.auto_form(call)[0] if call.form == "auto" else call.form
        return dict(family.vjp(call, form, do, dstate))

    def step(self, call: Call) -> tuple[Any, Any]:
        """One decoding step: gather the pool rows, run one recurrent step, write them back."""
        xp, idx = call.xp, call.state_indices
        pair = isinstance(call.state_pool, tuple | list)
        pools = tuple(call.state_pool) if pair else (call.state_pool,)
        current = tuple(gather_rows(xp, pool, idx) for pool in pools)
        sequence = dataclasses.replace(
            call,
            initial_state=current if pair else current[0],
            state_pool=None,
            state_indices=None,
            output_final_state=True,
            form="recurrent",
        )
        o, final = self.run(sequence)
        finals = final if pair else (final,)
        written = tuple(
            write_rows(xp, pool, idx, new) for pool, new in zip(pools, finals, strict=True)
        )
        return o[:, 0, ...], (written if pair else written[0])


backend = ReferenceBackend()
