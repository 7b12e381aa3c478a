"""The machine's own limits, measured in the same run as everything else: the float32 matmul
rate (the most FLOP/s a real workload gets) and the memory copy bandwidth (the least time to
touch data once)."""

from __future__ import annotations

import numpy as np

from fastweights._bench import backend_namespace, copy_gbs, matmul_gflops


class MachineLimits:
    params = ["numpy", "cupy"]
    param_names = ["device"]
    timeout = 300

    def setup(self, device: str) -> None:
        self.xp = np if device == "numpy" else backend_namespace("cupy", "linear_attn")

    def track_matmul_gflops(self, device: str) -> float:
        return matmul_gflops(self.xp)

    track_matmul_gflops.unit = "GFLOP/s"  # type: ignore[attr-defined]

    def track_copy_gbs(self, device: str) -> float:
        return copy_gbs(self.xp)

    track_copy_gbs.unit = "GB/s"  # type: ignore[attr-defined]
