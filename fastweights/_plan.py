"""``fastweights.plan``: how a call would run, without running it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ._ops import RULES
from ._registry import Plan, plan_call
from ._validate import validate, validate_step


def plan(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Plan:
    """The backend, form and parameters ``op(*args, **kwargs)`` would run with, and why.

    ``op`` is a public op (``fastweights.gla``) or decoding step (``fastweights.step.gla``);
    the arguments are validated exactly as the call would validate them, and the choice is the
    one the call makes (the same plans serve ``form="auto"`` and ``python -m fastweights
    plan``). Nothing is computed.

    Examples
    --------
    >>> import numpy as np, fastweights
    >>> q = k = v = np.ones((1, 64, 2, 16), dtype=np.float32)
    >>> gk = np.zeros((1, 64, 2, 16), dtype=np.float32)
    >>> p = fastweights.plan(fastweights.gla, q, k, v, gk, backend="reference")
    >>> p.backend, p.form
    ('reference', 'recurrent')
    >>> fastweights.plan(fastweights.gla, q, k, v, gk, form="chunk", backend="reference").params
    {'chunk_size': 64}
    >>> fastweights.plan(fastweights.iplr, q, k, v, k, v, backend="reference").op
    'dplr'
    """
    name = getattr(op, "__name__", None)
    module = getattr(op, "__module__", "")
    if name not in RULES or module not in ("fastweights", "fastweights.step"):
        raise TypeError(f"op must be a fastweights op or step function, got {op!r}")
    bound = inspect.signature(op).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    backend = arguments.pop("backend")
    if module == "fastweights.step":
        call = validate_step(name, **arguments)
    else:
        call = validate(name, **arguments)
    return plan_call(call, backend)
