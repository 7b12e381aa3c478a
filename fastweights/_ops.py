"""The registry of rules: every op's description (:class:`fastweights.rules.Rule`), by name.

A rule family (a package under :mod:`fastweights.rules`) lists its rules in ``RULES``;
registering a family here is one line. Validation, the public functions, the backends' tables,
:mod:`fastweights.testing` and the benchmarks read these descriptions.
"""

from __future__ import annotations

from types import ModuleType

from .rules import delta, dplr, mesa, recurrent_delta, srwm
from .rules._rule import FORMS, Arg, Rule

FAMILIES: dict[str, ModuleType] = {
    "delta": delta,
    "dplr": dplr,
    "mesa": mesa,
    "recurrent_delta": recurrent_delta,
    "srwm": srwm,
}
"""Family name -> its package: descriptions, problem preparation and forms."""

RULES: dict[str, Rule] = {rule.name: rule for family in FAMILIES.values() for rule in family.RULES}
"""Every public op."""

OPS: dict[str, Rule] = {name: rule for name, rule in RULES.items() if rule.parent is None}
"""The ops a backend implements; an instance rule reaches backends as its parent."""

ARG_NAMES = frozenset(arg.name for rule in RULES.values() for arg in rule.args)
"""Every array argument name after ``q, k, v`` of any rule."""


__all__ = ["ARG_NAMES", "FAMILIES", "FORMS", "OPS", "RULES", "Arg", "Rule"]
