"""The ``dask`` backend: Dask arrays in, lazy Dask arrays out, for every op's sequence form.

It takes only calls whose arrays are Dask arrays (NumPy or CuPy blocks) and builds a task
graph; each block of the graph is an ordinary fastweights call on plain arrays, which the
backend that accepts it runs on the worker (numba for NumPy blocks where it is installed, cupy
for CuPy blocks, the reference backend otherwise, or a plugin). Blocks along ``B`` and ``HV``
are independent. Blocks along ``T`` are combined exactly, in one of two ways (see
:mod:`._graph`): a parallel scan of per-block summaries for the rules whose state after a block
is an affine map of the state before it (:attr:`Rule.transition`), or passing the state from
block to block. Nothing is computed until the caller computes the result.

Install it with the ``dask`` extra: ``pip install ".[dask]"`` in a checkout of the repository
(fastweights is not on PyPI yet).

Examples
--------
>>> import numpy as np, dask.array as da, fastweights
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((2, 64, 2, 8)) for _ in range(3))
>>> gk = -rng.random((2, 64, 2, 8))
>>> lazy = [da.from_array(x, chunks=(1, 16, 2, 8)) for x in (q, k, v, gk)]
>>> o, S = fastweights.gla(*lazy, output_final_state=True)
>>> type(o).__name__, o.numblocks
('Array', (2, 4, 1, 1))
>>> o_np, S_np = fastweights.gla(q, k, v, gk, output_final_state=True)
>>> bool(np.allclose(o.compute(), o_np, atol=1e-12)), bool(np.allclose(S.compute(), S_np))
(True, True)
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import array_api_compat

from fastweights.backends import OPS, Call, install_hint


class DaskBackend:
    name = "dask"
    priority = 30  # above every backend of plain arrays: it takes only Dask arrays
    ops: ClassVar[dict[str, tuple[str, ...]]] = {op: rule.forms for op, rule in OPS.items()}
    step_ops: tuple[str, ...] = ()
    dtypes = "those of the backend that runs each block"
    limits: ClassVar[dict[str, str]] = {"K": "whole in every block", "V": "whole in every block"}

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("dask") is None:
            return f"dask is not installed ({install_hint('dask')})"
        return None

    def rejects(self, call: Call) -> str | None:
        from ._graph import block_type

        if not array_api_compat.is_dask_namespace(call.xp):
            return f"it runs Dask arrays only, got {call.xp.__name__} arrays"
        kind = block_type(call)
        if kind is None:
            return "its blocks must be NumPy or CuPy arrays"
        return None

    def plan(self, call: Call) -> dict[str, Any]:
        """The blocks, how time blocks combine, and why; each block's backend picks its form."""
        from ._graph import Blocks

        return Blocks.of(call).plan()

    def run(self, call: Call) -> tuple[Any, Any]:
        from ._graph import run

        return run(call)

    def step(self, call: Call) -> tuple[Any, Any]:  # pragma: no cover - step_ops is empty
        raise TypeError("the dask backend runs sequence calls only")


backend = DaskBackend()
