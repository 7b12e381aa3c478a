"""The ``reference`` backend: the pure Array API math of :mod:`fastweights.rules`.

It accepts every namespace, dtype, op and form, and has the lowest priority: the automatic
choice takes it only when no faster backend accepts a call. It is the float64 oracle the
other backends are tested against.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastweights import rules
from fastweights._ops import OPS
from fastweights._validate import Call


class ReferenceBackend:
    name = "reference"
    priority = 0
    ops: ClassVar[dict[str, tuple[str, ...]]] = {op: spec.forms for op, spec in OPS.items()}
    step_ops = tuple(OPS)

    def unavailable(self) -> str | None:
        return None

    def rejects(self, call: Call) -> str | None:
        return None

    def run(self, call: Call) -> tuple[Any, Any]:
        return rules.run(call)

    def step(self, call: Call) -> tuple[Any, Any]:
        return rules.step(call)


backend = ReferenceBackend()
