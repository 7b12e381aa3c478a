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

ONE_TASK_PER_HEAD = frozenset({"mesa_net", "recurrent_delta_rule", "srwm"})
"""Ops whose kernels run one task per (sequence, value head), with no value blocks: a solve
per token, or a slow net that mixes every value column into the next token's inputs."""


def _updates_per_token_head(call: Call) -> int:
    """Work per token and value head in state-element updates of the delta family's fused
    pass (6 FLOPs each)."""
    K, V = call.K, call.V + (1 if call.normalize else 0)
    if call.op == "mesa_net":
        if call.options.get("solver", "exact") == "exact":
            flops = K**3 // 3 + 6 * K * K + 4 * K * V
        else:
            its = int(call.options.get("max_cg_iterations", 30))
            flops = its * (2 * K * K + 10 * K) + 4 * K * K + 4 * K * V
        return flops // 6
    if call.op == "recurrent_delta_rule":
        return (6 * K * V + 2 * (2 * K + V) * V) // 6
    if call.op == "srwm":
        return 8 * K * (V + 2 * K + 4) // 6
    return WORK_PER_ELEMENT.get(call.op, 1) * K * V


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
    elif call.op not in ONE_TASK_PER_HEAD:
        tasks *= -(-V // VB)
    rows = tokens * call.num_householder
    updates = _updates_per_token_head(call) * rows * call.HV
    out["threads"] = threads_for(updates, tasks)
    return out
