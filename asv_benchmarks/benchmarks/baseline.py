"""What a user would write instead: a plain per-token NumPy loop, heads vectorised."""

from __future__ import annotations

from fastweights._bench import best_time, flops_per_token, make_inputs, numpy_loop_gated_delta_rule

from ._quick import REPEAT, SMOKE

H = 4


class NumpyLoop:
    params = ([512] if SMOKE else [512, 8192], [64] if SMOKE else [64, 128])
    param_names = ["T", "K=V"]
    timeout = 600

    def setup(self, T: int, D: int) -> None:
        self.args, _ = make_inputs("gated_delta_rule", 1, T, H, D, D)

    def time_gated_delta_rule(self, T: int, D: int) -> None:
        numpy_loop_gated_delta_rule(*self.args)

    def track_gflops(self, T: int, D: int) -> float:
        seconds = best_time(lambda: numpy_loop_gated_delta_rule(*self.args), repeat=min(REPEAT, 2))
        return flops_per_token("gated_delta_rule", H, D, D) * T / seconds / 1e9

    track_gflops.unit = "GFLOP/s"  # type: ignore[attr-defined]
