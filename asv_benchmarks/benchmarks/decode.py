"""Decoding: one ``fastweights.step`` token for a batch of sequences in a state pool.

A step reads and writes each state once at least, so its floor is a copy of the pool:
``track_fraction_of_copy`` is the copy's time over the step's (1.0 = at the memory limit).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fastweights
from fastweights._bench import (
    OPS,
    backend_namespace,
    best_time,
    step_inputs,
    step_pool,
    synchronize,
)

from ._quick import REPEAT, SMOKE

BACKENDS = ["reference", "numba", "cupy"]
H, D = 16, 128


class Decode:
    params = (list(OPS), BACKENDS, [1] if SMOKE else [1, 32, 256])
    param_names = ["op", "backend", "B"]
    timeout = 300

    def setup(self, op: str, backend: str, B: int) -> None:
        self.xp = xp = backend_namespace(backend, op, step=True)
        on_gpu = xp is not np
        if (B == 32 and on_gpu) or (B == 256 and not on_gpu):
            raise NotImplementedError("B = 32 is the CPU size, B = 256 the GPU size")
        args, kwargs = step_inputs(op, B, H, D, D, xp)
        self.pool = step_pool(op, B, H, D, D, xp)  # [B, H, D, D] or the rule's own layout
        self.step = getattr(fastweights.step, op)
        self.args, self.kwargs, self.backend = args, kwargs, backend
        self.call()

    def call(self) -> Any:
        return self.step(*self.args, self.pool, **self.kwargs, backend=self.backend)

    def time_step(self, op: str, backend: str, B: int) -> None:
        self.call()
        synchronize(self.xp)

    def track_fraction_of_copy(self, op: str, backend: str, B: int) -> float:
        parts = self.pool if isinstance(self.pool, tuple) else (self.pool,)
        targets = [self.xp.empty_like(p) for p in parts]

        def copy() -> None:
            for target, part in zip(targets, parts, strict=True):
                target[...] = part

        repeat = 5 if REPEAT > 1 else 1
        return best_time(copy, self.xp, repeat) / best_time(self.call, self.xp, repeat)

    track_fraction_of_copy.unit = "copy time / step time"  # type: ignore[attr-defined]
