"""The numba backend's choices for a call, in one place: form, chunk size and threads.

``run`` and ``step`` follow the plan, and :func:`fastweights.plan` shows it.
"""

from __future__ import annotations

from typing import Any

from fastweights.backends import Call

from ._layout import sequences, threads_for
from ._passes import VB
from .chunk import MAX_CHUNK

WORK_PER_ELEMENT = {"dplr": 2}
"""State-element updates per element and step, relative to the delta family's fused pass
(the DPLR pass does five vector operations per element against the delta family's two to
three)."""


def _lengths(call: Call) -> tuple[int, int, int]:
    """``(sequences, total tokens, longest sequence)`` of the call."""
    if call.cu_seqlens is None:  # the fast path: decoding steps come here
        return call.B, call.B * call.T, call.T
    _, t0, t1 = sequences(call)
    lengths = t1 - t0
    return lengths.shape[0], int(lengths.sum()), int(lengths.max()) if lengths.size else 0


def plan(call: Call) -> dict[str, Any]:
    """``{"form", "why", "threads"[, "chunk_size"]}`` for ``call``.

    The recurrent form unless another is asked for (one fused pass per step is the fastest
    form on CPUs, docs/numba.md); chunks of ``min(chunk_size, MAX_CHUNK, longest sequence)``
    rows; one thread per ``2**20`` state-element updates up to the number of parallel tasks
    (sequences x value heads, x value blocks in the recurrent form).
    """
    count, tokens, longest = _lengths(call)
    V = call.V + (1 if call.normalize else 0)
    out: dict[str, Any] = {}
    if call.is_step:
        out["form"] = "recurrent"
        out["why"] = "one token: the step kernel updates the pool rows in place"
    elif call.form == "auto":
        out["form"] = "recurrent"
        out["why"] = "the fused recurrent pass is the fastest form on CPUs (docs/numba.md)"
    else:
        out["form"], out["why"] = call.form, "asked for"
    tasks = count * call.HV
    if out["form"] == "chunk":
        rows = longest * call.num_householder
        out["chunk_size"] = max(1, min(call.chunk_size, MAX_CHUNK, rows))
    else:
        tasks *= -(-V // VB)
    rows = tokens * call.num_householder
    updates = WORK_PER_ELEMENT.get(call.op, 1) * rows * call.HV * call.K * V
    out["threads"] = threads_for(updates, tasks)
    return out
