"""The rules, by family, written once against the Array API standard.

Each family is a package that owns its rules' descriptions (:class:`Rule`), its problem
preparation (``prepare``: a validated call as head-major arrays in the compute dtype) and its
forms:

- :mod:`.delta` -- the first wave, every rule an instance of one gated delta rule;
- :mod:`.dplr` -- the diagonal-plus-low-rank rule and its instances ``iplr`` and ``rwkv7``.

Only standard Array API functions are used (through array-api-compat), and no array is
modified in place, so the same code runs on NumPy, CuPy, torch, JAX and array-api-strict. It
is the float64 oracle of every other backend (the ``reference`` backend runs it).
"""

from __future__ import annotations

from ._rule import FORMS, Arg, Rule

__all__ = ["FORMS", "Arg", "Rule"]
