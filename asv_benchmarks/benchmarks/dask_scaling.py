"""The dask backend on a local cluster against the direct numba call (issue 16).

float32, H=4, K=V=128, ``gated_delta_rule``, two workloads:

- ``long``: one sequence, B=1, T=2**17, cut into one time block per worker (time blocks
  combine by the prefix scan; its summaries run the block with V + K value columns);
- ``batch``: B=16, T=8192, cut into one batch block per worker (independent blocks).

``time_call`` times building the graph and ``client.compute((o, S), sync=True)`` on a
``distributed.LocalCluster`` of 1 or 2 worker processes of one thread each (inputs persisted on
the workers; started in ``setup``, closed in ``teardown``), or the direct call on NumPy arrays
with one numba thread. ``asv_benchmarks/dask_scaling.py`` measures more configurations in one
run and draws the figure of docs/guides/dask.md. In quick runs (``asv run --quick``,
``FASTWEIGHTS_ASV_SMOKE``; see ``_quick.py``) only the long workload runs, at T=512, directly
and on 2 workers.
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from typing import Any

import numpy as np

import fastweights
from fastweights._bench import make_inputs

from ._quick import SMOKE

H, D = 4, 128
WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WORKLOADS = {  # name: (B, T, the axis cut into one block per worker)
    "long": (1, 512 if SMOKE else 2**17, 1),
    "batch": (4 if SMOKE else 16, 512 if SMOKE else 8192, 0),
}
RUNNERS = {"numba 1 thread": 0, "dask 1 worker": 1, "dask 2 workers": 2}


class DaskScaling:
    params = (list(WORKLOADS), list(RUNNERS))
    param_names = ["workload", "runner"]
    timeout = 300
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0.0

    def setup(self, workload: str, runner: str) -> None:
        workers = RUNNERS[runner]
        if SMOKE and (workload != "long" or workers == 1):
            raise NotImplementedError("quick run: long workload; numba and 2 workers")
        for name in ("numba", "distributed"):
            if importlib.util.find_spec(name) is None:
                raise NotImplementedError(f"{name} is not installed")
        B, T, axis = WORKLOADS[workload]
        self.args, self.kwargs = make_inputs("gated_delta_rule", B, T, H, D, D)
        self.client: Any = None
        self.cluster: Any = None
        if workers:
            self._start(workers, axis)
        else:
            import numba

            numba.set_num_threads(1)
        self.time_call(workload, runner)  # compile here; workers load the kernels from disk

    def _start(self, workers: int, axis: int) -> None:
        import dask.array as da
        import distributed

        warnings.filterwarnings("ignore", "Port .* is already in use", UserWarning)
        self.cluster = distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env=WORKER_ENV,
        )
        self.client = distributed.Client(self.cluster)
        fastweights.gated_delta_rule(*self.args, **self.kwargs)  # compile in this process

        def chunked(x: Any) -> Any:
            if not isinstance(x, np.ndarray):
                return x
            n = x.shape[axis]
            edges = [n * i // workers for i in range(workers + 1)]
            along = tuple(b - a for a, b in itertools.pairwise(edges))
            return da.from_array(x, chunks=tuple(along if i == axis else -1 for i in range(x.ndim)))

        lazy = [chunked(x) for x in (*self.args, *self.kwargs.values())]
        lazy = self.client.persist(lazy)
        distributed.wait(lazy)
        self.args = tuple(lazy[: len(self.args)])
        self.kwargs = dict(zip(self.kwargs, lazy[len(self.args) :], strict=True))

    def teardown(self, workload: str, runner: str) -> None:
        for part in (getattr(self, "client", None), getattr(self, "cluster", None)):
            if part is not None:
                part.close()

    def time_call(self, workload: str, runner: str) -> None:
        o, S = fastweights.gated_delta_rule(*self.args, **self.kwargs, output_final_state=True)
        if self.client is not None:
            self.client.compute((o, S), sync=True)
