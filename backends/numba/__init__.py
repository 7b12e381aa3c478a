"""The ``numba`` backend: CPU kernels for NumPy arrays, compiled with numba.

Every first-wave op and ``dplr`` (with its instances ``iplr`` and ``rwkv7``) in the recurrent
form (one fused pass over an L1-resident block of the state per step, parallel over sequences,
value heads and value blocks) and in decoding steps that update the state pool in place; the
first-wave ops also in the chunk form. It is chosen automatically for NumPy
arrays (priority 10) when numba is installed. Nothing is compiled or imported from numba
until the first call; compiled kernels are cached on disk (numba's ``cache=True``).

See ``docs/numba.md`` for the design, the settings the speed depends on and measurements.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import numpy as np

from fastweights.backends import Call

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
        "dplr": ("recurrent",),
    }
    """What it runs, declared op by op: it is never handed anything else (``iplr`` and
    ``rwkv7`` arrive as ``dplr``)."""
    step_ops = (*FIRST_WAVE, "dplr")
    dtypes = "real floating (computed in float32, or float64 when an input is wider)"
    limits: ClassVar[dict[str, str]] = {}

    def unavailable(self) -> str | None:
        spec = importlib.util.find_spec("numba")
        # A folder named numba on sys.path (e.g. a test directory) is a namespace package
        # without an origin, not numba.
        if spec is None or spec.origin is None:
            return "numba is not installed (pip install 'fastweights[numba]')"
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
        """The form, chunk size and threads this backend runs ``call`` with, and why.

        The same choices ``run`` and ``step`` make (see ``docs/numba.md``): the recurrent form
        unless another is asked for, chunks of ``min(chunk_size, 1024, longest sequence)``
        rows, one thread per ``2**20`` state-element updates up to the task count.
        """
        from ._layout import sequences, threads_for
        from ._passes import VB

        seq_b, t0, t1 = sequences(call)
        rows = (t1 - t0) * call.num_householder
        V = call.V + (1 if call.normalize else 0)
        work = int(rows.sum()) * call.HV * call.K * V
        form = "recurrent" if call.form == "auto" or call.is_step else call.form
        plan: dict[str, Any] = {"form": form}
        if call.is_step:
            plan["why"] = "one token: the step kernel updates the pool rows in place"
        elif call.form == "auto":
            plan["why"] = "the fused recurrent pass is the fastest form on CPUs (docs/numba.md)"
        else:
            plan["why"] = "asked for"
        tasks = seq_b.shape[0] * call.HV
        if form == "chunk":
            from .chunk import MAX_CHUNK

            longest = int(rows.max()) if rows.size else 1
            plan["chunk_size"] = max(1, min(call.chunk_size, MAX_CHUNK, longest))
        else:
            tasks *= -(-V // VB)
        plan["threads"] = threads_for(work, tasks)
        return plan

    def run(self, call: Call) -> tuple[Any, Any]:
        from ._driver import run

        return run(call)

    def step(self, call: Call) -> tuple[Any, Any]:
        from ._driver import step

        return step(call)


backend = NumbaBackend()
