"""Gradients on the numba backend: the forward alone against the forward plus the backward.

Issue 13's target: ``fastweights.vjp`` and its pullback (forward plus backward) within 3.5x
the forward alone, float32, B=1, T=8192, H=4, K=V=128, ``gated_delta_rule`` and ``kda``.
``track_ratio`` is that ratio (best of ``REPEAT`` each, same process). Quick runs
(``asv run --quick``, CI's smoke run) use T=512, K=V=64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fastweights
from fastweights._bench import best_time, make_inputs, run_op

from ._quick import REPEAT, SMOKE

OPS = ["gated_delta_rule", "kda"]
T = 512 if SMOKE else 8192
D = 64 if SMOKE else 128
H = 4


class Gradients:
    params = (OPS,)
    param_names = ["op"]
    timeout = 900

    def setup(self, op: str) -> None:
        try:
            import numba  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError("numba is not installed") from exc
        self.op = op
        self.args, self.kwargs = make_inputs(op, 1, T, H, D, D)
        o = self.forward()
        self.do = np.ones_like(o[0] if isinstance(o, tuple) else o)
        self.forward_backward()  # compile (or load numba's cache) outside the timing

    def forward(self) -> Any:
        return run_op(self.op, self.args, self.kwargs, backend="numba")

    def forward_backward(self) -> Any:
        _, _, pullback = fastweights.vjp(self.op, *self.args, **self.kwargs, backend="numba")
        return pullback(self.do)

    def time_forward(self, op: str) -> None:
        self.forward()

    def time_forward_backward(self, op: str) -> None:
        self.forward_backward()

    def track_ratio(self, op: str) -> float:
        return best_time(self.forward_backward, repeat=REPEAT) / best_time(
            self.forward, repeat=REPEAT
        )

    track_ratio.unit = "x forward"  # type: ignore[attr-defined]
