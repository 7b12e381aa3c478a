"""The reference backend's math: each rule written once against the Array API standard.

Every op is an instance of one general update rule (``fastweights._ops``);
:func:`fastweights.rules._layout.prepare` turns a validated call into that rule's inputs,
and the forms run it:

- :mod:`.recurrent` -- the rule step by step, the definition;
- :mod:`.chunk` -- the chunk form (WY/UT transform for the delta family) and the parallel form
  as its one-chunk case.

Only standard Array API functions are used (through array-api-compat), and no array is
modified in place, so the same code runs on NumPy, CuPy, torch, JAX and array-api-strict.
It is the float64 oracle of every other backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .._ops import form_unavailable
from .._pool import gather_rows, write_rows
from .._validate import Call
from ._layout import prepare
from .chunk import chunk
from .recurrent import recurrent

__all__ = ["auto_form", "run", "step"]


def auto_form(call: Call) -> str:
    """The form ``"auto"`` picks on the reference backend.

    The chunk form (matrix products over all chunks at once) wherever the call has it, except
    for per-key-channel decays (``gla``, ``kda``): their elementwise diagonal blocks make the
    chunk form no faster than the recurrent one on NumPy (asv on 832615d, 2-core Xeon, T=8192,
    H=4, K=V=128: gla 8.3k vs 8.1k tokens/s, kda 4.5k vs 7.6k; K=V=64: gla 16k vs 26k, kda 8.7k
    vs 24k; docs/forms.md has the same comparison from the latest run).
    """
    unavailable = form_unavailable(
        call.op, "chunk", packed=call.cu_seqlens is not None, beta_per_value=call.beta_per_value
    )
    if unavailable or call.spec.gate == "gk" or call.T * call.num_householder <= 1:
        return "recurrent"
    return "chunk"


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call, in the form it asks for."""
    form = auto_form(call) if call.form == "auto" else call.form
    problem, finish = prepare(call)
    if form == "recurrent":
        o, state = recurrent(problem)
    else:
        o, state = chunk(problem, call.chunk_size, one_chunk=form == "parallel")
    return finish(o, state)


def step(call: Call) -> tuple[Any, Any]:
    """One decoding step: gather the pool rows, run one recurrent step, write them back."""
    xp, idx = call.xp, call.state_indices
    pools = call.state_pool if call.normalize else (call.state_pool,)
    current = tuple(gather_rows(xp, pool, idx) for pool in pools)
    sequence = dataclasses.replace(
        call,
        initial_state=current if call.normalize else current[0],
        state_pool=None,
        state_indices=None,
        output_final_state=True,
        form="recurrent",
    )
    o, final = run(sequence)
    finals = final if call.normalize else (final,)
    written = tuple(write_rows(xp, pool, idx, new) for pool, new in zip(pools, finals, strict=True))
    return o[:, 0, ...], (written if call.normalize else written[0])
