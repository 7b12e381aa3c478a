"""The ``numba`` backend: CPU kernels for NumPy arrays, compiled with numba.

Every first-wave op, ``dplr`` (with its instances ``iplr`` and ``rwkv7``), ``mesa_net``,
``recurrent_delta_rule`` and ``srwm`` in the recurrent form (one fused pass over an
L1-resident block of the state per step, parallel over sequences, value heads and, where the
rule allows, value blocks) and in decoding steps that update the state pool in place; the
first-wave ops also in the chunk form. It is chosen automatically for NumPy arrays (priority
10) when numba is installed. Nothing is compiled or imported from numba until the first call;
compiled kernels are cached on disk (numba's ``cache=True``).

See ``docs/numba.md`` for the design, the settings the speed depends on and measurements.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import numpy as np

from fastweights.backends import Call, install_hint

FIRST_WAVE = (
    "linear_attn",
    "simple_gla",
    "gla",
    "delta_rule",
    "gated_delta_rule",
    "kda",
    "delta_product",
)
"""The delta family's ops (``retention`` arrives as ``simple_gla``)."""

RECURRENT_ONLY = ("dplr", "mesa_net", "recurrent_delta_rule", "srwm")
"""Ops with a recurrent kernel and no chunk kernel here (the reference backend has
``dplr``'s and ``mesa_net``'s chunk forms)."""


class NumbaBackend:
    """NumPy arrays on the CPU; real floating inputs of any size and byte order.

    The kernels compute in the call's native float32 or float64 (``Call.dtype``); inputs are
    converted to it (big-endian, float16 and ``longdouble`` included), ``o`` comes back in
    ``v``'s dtype.
    """

    name = "numba"
    priority = 10
    ops: ClassVar[dict[str, tuple[str, ...]]] = {
        **{op: ("recurrent", "chunk") for op in FIRST_WAVE},
        **{op: ("recurrent",) for op in RECURRENT_ONLY},
    }
    """What it runs, declared op by op: it is never handed anything else (``iplr`` and
    ``rwkv7`` arrive as ``dplr``)."""
    step_ops = (*FIRST_WAVE, *RECURRENT_ONLY)
    dtypes = "real floating (computed in float32, or float64 when an input is wider)"
    limits: ClassVar[dict[str, str]] = {}

    def unavailable(self) -> str | None:
        spec = importlib.util.find_spec("numba")
        # A folder named numba on sys.path (e.g. a test directory) is a namespace package
        # without an origin, not numba.
        if spec is None or spec.origin is None:
            return f"numba is not installed ({install_hint('numba')})"
        return None

    def rejects(self, call: Call) -> str | None:
        if call.xp.__name__.split(".")[-1] != "numpy":
            return f"it runs NumPy arrays only, got {call.xp.__name__} arrays"
        arrays = [call.q, call.k, call.v, *call.inputs.values()]
        for state in (call.initial_state, call.state_pool):
            if state is not None:
                arrays.extend(state if isinstance(state, tuple | list) else (state,))
        for x in arrays:
            if x is None:
                continue
            if not isinstance(x, np.ndarray):
                return f"it runs numpy.ndarray inputs only, got {type(x).__name__}"
            if x.dtype.kind != "f":
                return f"it runs real floating arrays, got {x.dtype}"
        return None

    def plan(self, call: Call) -> dict[str, Any]:
        """The form, chunk size and threads ``run`` and ``step`` use for ``call``, and why."""
        from ._plan import plan

        return plan(call)

    def run(self, call: Call) -> tuple[Any, Any]:
        from ._driver import run

        return run(call)

    def step(self, call: Call) -> tuple[Any, Any]:
        from ._driver import step

        return step(call)

    def vjp_rejects(self, call: Call) -> str | None:
        """Why the gradient kernels do not take ``call`` (the reference backend then computes
        its gradients), or None: they cover the first wave except a per-value ``beta``."""
        if call.op not in FIRST_WAVE:
            return f"no numba gradient kernel for {call.op}"
        if call.beta_per_value:
            return "a per-value beta has no numba gradient kernel"
        return None

    def vjp(self, call: Call, do: Any, dstate: Any) -> dict[str, Any]:
        """Gradients of the call's raw arguments (:func:`fastweights.vjp`) by the chunkwise
        backward kernel of ``gradients.py``, whatever form the forward ran (the forms compute
        the same function; the chunkwise backward is the fast one)."""
        from fastweights.backends import FAMILIES

        from .gradients import chunk_vjp, recurrent_vjp

        sweeps = {"recurrent": recurrent_vjp, "chunk": chunk_vjp, "parallel": chunk_vjp}
        return dict(FAMILIES[call.spec.family].vjp(call, call.form, do, dstate, sweeps=sweeps))


backend = NumbaBackend()
