"""A Gated DeltaNet layer's forward in plain NumPy, against the sum of its parts timed alone.

Users put the kernel between matmuls: input projections (fused ``q k v`` and the gates), the
fastweights op, the output projection. Each part leaves threads behind that may still be busy
when the next one starts (OpenBLAS's workers spin for about 0.1 s after a matmul; an OpenMP
runtime's may spin after a parallel region), so a layer can be slower than its parts.
``track_layer_over_parts`` is the layer's median time over the sum of the parts' medians, each
part timed alone after a pause, all interleaved in one run (target: at most 1.15).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import fastweights
from fastweights._bench import backend_namespace

from ._quick import SMOKE

H, K, V, D_MODEL = 4, 128, 128, 512
PAUSE = 0.3
"""Seconds of idle before timing a part alone: longer than OpenBLAS's spin after a matmul."""


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(x, np.float32(0))


class GatedDeltaNetLayer:
    """B=1, T=8192, H=4, K=V=128, model width 512, float32, numba (``form="auto"``)."""

    timeout = 600
    repeats = 7

    def setup(self) -> None:
        backend_namespace("numba", "gated_delta_rule")
        self.T = 512 if SMOKE else 8192
        if SMOKE:
            self.repeats = 1
        rng = np.random.default_rng(0)
        f32 = np.float32
        self.x = rng.standard_normal((self.T, D_MODEL), dtype=f32)
        self.w_qkv = rng.standard_normal((D_MODEL, H * (2 * K + V)), dtype=f32) / 23
        self.w_gates = rng.standard_normal((D_MODEL, 2 * H), dtype=f32) / 23
        self.w_out = rng.standard_normal((H * V, D_MODEL), dtype=f32) / 23
        self.layer()  # compile (or load the cache) and warm the allocator

    def project_in(self) -> tuple[Any, ...]:
        T = self.T
        qkv = self.x @ self.w_qkv
        q = qkv[:, : H * K].reshape(1, T, H, K)
        k = qkv[:, H * K : 2 * H * K].reshape(1, T, H, K)
        v = qkv[:, 2 * H * K :].reshape(1, T, H, V)
        gates = self.x @ self.w_gates
        g = -_softplus(gates[:, :H]).reshape(1, T, H)
        beta = (1 / (1 + np.exp(-gates[:, H:]))).reshape(1, T, H)
        return q, k, v, g, beta

    def recurrence(self, inputs: tuple[Any, ...]) -> np.ndarray:
        o, _ = fastweights.gated_delta_rule(*inputs, use_qk_l2norm=True, backend="numba")
        return o

    def project_out(self, o: np.ndarray) -> np.ndarray:
        return o.reshape(self.T, H * V) @ self.w_out

    def layer(self) -> np.ndarray:
        return self.project_out(self.recurrence(self.project_in()))

    def _medians(self) -> dict[str, float]:
        inputs, o = self.project_in(), self.layer()
        parts: dict[str, Callable[[], Any]] = {
            "layer": self.layer,
            "project_in": self.project_in,
            "recurrence": lambda: self.recurrence(inputs),
            "project_out": lambda: self.project_out(o),
        }
        times: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(self.repeats):
            for name, fn in parts.items():
                time.sleep(PAUSE)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(t) for name, t in times.items()}

    def track_layer_over_parts(self) -> float:
        m = self._medians()
        return m["layer"] / (m["project_in"] + m["recurrence"] + m["project_out"])

    track_layer_over_parts.unit = "layer time / sum of parts"  # type: ignore[attr-defined]

    def track_numpy_only_layer_over_parts(self) -> float:
        """The same ratio with the op replaced by ``zeros_like(v)``: what the NumPy parts cost
        each other on this machine, without fastweights (the baseline for the ratio above)."""
        recurrence = self.recurrence
        self.recurrence = lambda inputs: np.zeros_like(inputs[2])  # type: ignore[method-assign]
        try:
            return self.track_layer_over_parts()
        finally:
            self.recurrence = recurrence  # type: ignore[method-assign]

    track_numpy_only_layer_over_parts.unit = "layer time / sum of parts"  # type: ignore[attr-defined]

    def track_recurrence_in_layer_over_alone(self) -> float:
        """The op right after the input projection, against the op after a pause."""
        inputs = self.project_in()
        inside, alone = [], []
        for _ in range(self.repeats):
            time.sleep(PAUSE)
            fresh = self.project_in()
            start = time.perf_counter()
            self.recurrence(fresh)
            inside.append(time.perf_counter() - start)
            time.sleep(PAUSE)
            start = time.perf_counter()
            self.recurrence(inputs)
            alone.append(time.perf_counter() - start)
        return statistics.median(inside) / statistics.median(alone)

    track_recurrence_in_layer_over_alone.unit = "time after a matmul / time alone"  # type: ignore[attr-defined]

    def time_layer(self) -> None:
        self.layer()
